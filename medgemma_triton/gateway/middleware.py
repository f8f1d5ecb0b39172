"""API key and request id, as plain ASGI middleware (no per-request wrapping of the response body,
so streamed events pass through untouched and as soon as they are sent)."""

from __future__ import annotations

import hmac
import re
import uuid

from medgemma_triton.gateway.errors import AUTHENTICATION, APIError

REQUEST_ID_HEADER = b"x-request-id"
# what a caller's id may be; anything else is replaced, so a header cannot inject into logs or responses
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without a key


def request_id_of(headers) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _REQUEST_ID.match(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def _bearer(headers) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class GatewayMiddleware:
    """Echoes (or assigns) `x-request-id` on every response; with an API key, answers 401 to requests
    without `Authorization: Bearer <key>` (compared in constant time)."""

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
            token = _bearer(headers)
            if token is None or not hmac.compare_digest(token, self.api_key):
                error = APIError(
                    401,
                    "missing API key: send Authorization: Bearer <key>" if token is None else "incorrect API key",
                    type=AUTHENTICATION, code="invalid_api_key",
                )
                return await _send_error(send_with_id, error, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send_with_id)


async def _send_error(send, error: APIError, extra_headers=()) -> None:
    body = error.json_bytes()
    await send({
        "type": "http.response.start",
        "status": error.status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *extra_headers],
    })
    await send({"type": "http.response.body", "body": body})
