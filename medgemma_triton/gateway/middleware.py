"""API key and request id, as plain ASGI middleware (no per-request wrapping of the response body,
so streamed events pass through untouched and as soon as they are sent)."""

from __future__ import annotations

import hmac
import re
import uuid

from medgemma_triton.gateway.errors import AUTHENTICATION, APIError, send_error

REQUEST_ID_HEADER = b"x-request-id"
# what a caller's id may be; anything else is replaced, so a header cannot inject into logs or responses
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without a key
BEARER = b"bearer "  # the scheme is case-insensitive (RFC 9110, 11.1); one space, then the key exactly


def request_id_of(headers) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _REQUEST_ID.match(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def api_key_refusal(headers, api_key: bytes) -> str | None:
    """Why the request's credentials are refused, or None for exactly one `Authorization: Bearer <key>`.

    The HTTP parser has already dropped whitespace around the header's value (RFC 9110, 5.5); anything
    else around or inside the key is part of what is compared, so it does not match.
    """
    values = [value for name, value in headers if name == b"authorization"]
    if not values:
        return "missing API key: send Authorization: Bearer <key>"
    if len(values) > 1:
        return f"{len(values)} Authorization headers: send exactly one, Authorization: Bearer <key>"
    value = values[0]
    # compare_digest runs in time independent of where the key differs; only its length can show
    if value[:len(BEARER)].lower() != BEARER or not hmac.compare_digest(value[len(BEARER):], api_key):
        return "incorrect API key"
    return None


class GatewayMiddleware:
    """Echoes (or assigns) `x-request-id` on every response; with an API key, answers 401 to requests
    without exactly one `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        request_id = request_id_of(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            refusal = api_key_refusal(headers, self.api_key)
            if refusal is not None:
                error = APIError(401, refusal, type=AUTHENTICATION, code="invalid_api_key")
                return await send_error(send_with_id, error, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send_with_id)
