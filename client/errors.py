"""Typed client errors: every failure a caller can handle is a `MedGemmaError` subclass.

Triton reports errors two ways, and both are mapped here:
- a failed RPC (connect, deadline, readiness, cancel) carries a gRPC status code;
- an error inside a gRPC stream carries only a message. The `medgemma` model is decoupled, so every
  inference goes over a stream and request errors arrive this way. The server marks client mistakes
  by starting the message with "invalid argument: " (see INVALID_ARGUMENT_PREFIX) and a server at its
  limit of requests in flight with "server busy: " (SERVER_BUSY_PREFIX); anything else is a
  server-side failure. The BLS model forwards its steps' messages unchanged; a repository served as a
  Triton ensemble prefixed them with "in ensemble 'medgemma', ", which is dropped.
"""

from __future__ import annotations

import re

from medgemma_triton.contract import (  # shared with the server
    INVALID_ARGUMENT_PREFIX,
    SERVER_BUSY_PREFIX,
    SERVER_STOPPING_PREFIX,
    TOP_MODEL,
)

_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
# Triton's words for a request to a model that is unloading (a server draining on SIGTERM) or absent
_NOT_SERVING = (f"Request for unknown model: '{TOP_MODEL}'",)


class MedGemmaError(Exception):
    """Base class. `status` is the gRPC status name (e.g. "INVALID_ARGUMENT") when one is known."""

    status: str | None = None
    retryable: bool = False  # the same request may succeed later or on another server

    def __init__(self, message: str, *, status: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(MedGemmaError, ValueError):
    """The request was refused as malformed or over a limit (gRPC INVALID_ARGUMENT)."""

    status = "INVALID_ARGUMENT"


class UnavailableError(MedGemmaError, ConnectionError):
    """The server cannot be reached (gRPC UNAVAILABLE: refused, reset, DNS, TLS handshake)."""

    status = "UNAVAILABLE"
    retryable = True


class ServerBusyError(UnavailableError):
    """The server refused the request at once: it is at its limit of requests in flight. Nothing was
    generated; retry later or on another server."""

    status = "RESOURCE_EXHAUSTED"


class ModelNotReadyError(UnavailableError):
    """The server answers but the model is not loaded or not ready."""


class DeadlineExceededError(MedGemmaError, TimeoutError):
    """The request did not finish within its timeout (gRPC DEADLINE_EXCEEDED)."""

    status = "DEADLINE_EXCEEDED"


class CancelledError(MedGemmaError):
    """The request was cancelled before it finished (gRPC CANCELLED)."""

    status = "CANCELLED"


class ServerError(MedGemmaError):
    """The server failed the request for a reason that is not the caller's (INTERNAL, UNKNOWN, ...)."""


_BY_STATUS = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
}


def strip_ensemble_prefix(message: str) -> str:
    return _ENSEMBLE_PREFIX.sub("", message, count=1)


def from_triton(exc) -> MedGemmaError:
    """Map a tritonclient `InferenceServerException` (RPC or in-stream) to a `MedGemmaError`."""
    raw_status = exc.status() or ""  # "StatusCode.INVALID_ARGUMENT", or None for in-stream errors
    status = raw_status.rsplit(".", 1)[-1] or None
    message = strip_ensemble_prefix(exc.message() or str(exc))
    if status is None and message.lower().startswith(INVALID_ARGUMENT_PREFIX):
        return InvalidArgumentError(message[len(INVALID_ARGUMENT_PREFIX):])
    if message.startswith(SERVER_BUSY_PREFIX):
        return ServerBusyError(message)
    if message.startswith(SERVER_STOPPING_PREFIX) or message.startswith(_NOT_SERVING):
        return UnavailableError(f"the server is not taking requests (stopping, or {TOP_MODEL} is not loaded): "
                                f"{message}", status="UNAVAILABLE")
    if status == "INVALID_ARGUMENT" and message.lower().startswith(INVALID_ARGUMENT_PREFIX):
        message = message[len(INVALID_ARGUMENT_PREFIX):]
    return _BY_STATUS.get(status, ServerError)(message, status=status)


def from_grpc(rpc_error) -> MedGemmaError:
    """Map a raw `grpc.RpcError` (tritonclient's aio stream iterator lets these through)."""
    status = rpc_error.code().name
    return _BY_STATUS.get(status, ServerError)(rpc_error.details() or status, status=status)


def describe_unavailable(url: str, details: str) -> str:
    """A one-line reason the server at `url` cannot be reached, from gRPC's details text."""
    if "connection refused" in details.lower():
        return f"connection refused at {url}"
    return f"cannot reach {url}: {details}"
