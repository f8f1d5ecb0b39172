"""OpenAI's error JSON, and the client's typed errors mapped onto HTTP statuses.

OpenAI SDKs read `{"error": {"message", "type", "param", "code"}}` and raise by status code
(400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...), so every refusal the
gateway makes or passes on has that shape.
"""

from __future__ import annotations

import json
import re

from medgemma_triton.client.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    MedGemmaError,
    ModelNotReadyError,
    ServerBusyError,
    UnavailableError,
)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """A request the gateway answers with an error status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        # ASCII with \u escapes: a message quoting a caller's text can then never fail to encode
        return json.dumps(self.body()).encode("ascii")


async def send_error(send, error: APIError, extra_headers=()) -> None:
    """`error` as a whole ASGI response, for code that answers below Starlette (middleware, protocol)."""
    body = error.json_bytes()
    await send({
        "type": "http.response.start",
        "status": error.status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *extra_headers],
    })
    await send({"type": "http.response.body", "body": body})


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# The server names what it refuses at the start of its message ("max_tokens is ...", "messages[0].role
# is ...", "images[1] is ..."); the OpenAI parameter is the first word of that path.
_PARAM_AT_START = re.compile(r"^(messages|images|max_tokens|temperature|top_p|top_k|random_seed|stop_words)\b")
_SERVER_PARAM = {"images": "messages", "random_seed": "seed", "stop_words": "stop"}
_SERVER_IMAGE = re.compile(r"^images\[(\d+)\]")


def from_client_error(error: MedGemmaError, image_locations: list[str] = ()) -> APIError:
    """A client error (the server's refusal or failure) as the HTTP error a caller sees.

    `image_locations[k]` is where the k-th image came from in the OpenAI request
    ("messages[1].content[2]"): the server numbers images, OpenAI callers number message parts.
    """
    message = error.message
    if isinstance(error, InvalidArgumentError):
        match = _SERVER_IMAGE.match(message)
        if match and int(match.group(1)) < len(image_locations):
            message = f"{image_locations[int(match.group(1))]} (image {match.group(1)})" + message[match.end():]
        param = _PARAM_AT_START.match(message)
        if param is not None:
            param = _SERVER_PARAM.get(param.group(1), param.group(1))
        elif "image" in message or "prompt" in message or "chat template" in message:
            param = "messages"
        return APIError(400, message, param=param)
    if isinstance(error, ServerBusyError):  # OpenAI's SDKs retry a 503 with backoff
        return APIError(503, message, type=SERVER_ERROR, code="server_busy")
    if isinstance(error, ModelNotReadyError):
        return APIError(503, f"the model is not ready: {message}", type=SERVER_ERROR, code="model_not_ready")
    if isinstance(error, UnavailableError):
        return APIError(502, f"the inference server is unreachable: {message}", type=SERVER_ERROR,
                        code="upstream_unavailable")
    if isinstance(error, DeadlineExceededError):
        return APIError(504, f"the inference server did not answer in time: {message}", type=SERVER_ERROR,
                        code="upstream_timeout")
    if isinstance(error, CancelledError):
        return APIError(502, f"the inference server cancelled the request: {message}", type=SERVER_ERROR,
                        code="upstream_cancelled")
    return APIError(500, f"the inference server failed the request: {message}", type=SERVER_ERROR,
                    code="upstream_error")
