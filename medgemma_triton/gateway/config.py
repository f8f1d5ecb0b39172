"""The gateway's settings, one dataclass shared by the CLI, `serve --openai-port` and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from medgemma_triton.runtime.limits import Limits

API_KEY_ENV = "MEDGEMMA_API_KEY"
DEFAULT_PORT = 9000
DEFAULT_MODEL_NAME = "medgemma-4b-it"
# The body is read whole before anything else, so it needs a bound of its own; the server's limits
# still apply to what passes. 192 MiB holds, as base64, four images of MEDGEMMA_MAX_IMAGE_BYTES (32 MiB)
# or a CT volume of 85 JPEG slices many times over (about 10 MiB at 512x512).
DEFAULT_MAX_REQUEST_BYTES = 192 * 2**20


@dataclass(frozen=True)
class ConnectionLimits:
    """How long the gateway waits on a client, and how many connections it holds (docs/openai.md).

    Each is overridable by one environment variable, MEDGEMMA_GATEWAY_<FIELD> (see env_name).
    """

    header_timeout_s: float = 10.0  # opening (or last response) to complete headers, which clients send at once
    body_timeout_s: float = 30.0  # the body's start, and any pause in it; beyond that it averages body_min_rate
    body_min_rate: int = 64 * 1024  # bytes per second; a trickle under it is cut off, as Apache's mod_reqtimeout
    keep_alive_timeout_s: float = 5.0  # idle between requests on one connection (uvicorn's default)
    max_connections: int = 1000  # past it a request is answered 503; kept to half the open-file limit too

    @staticmethod
    def env_name(field_name: str) -> str:
        return "MEDGEMMA_GATEWAY_" + field_name.upper()

    @classmethod
    def from_env(cls, environ=os.environ) -> "ConnectionLimits":
        values = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is None:
                continue
            kind = type(f.default)
            try:
                value = kind(raw)
            except ValueError:
                expected = "an integer" if kind is int else "a number"
                raise ValueError(f"{cls.env_name(f.name)}={raw!r} is not {expected}") from None
            if not value > 0:
                raise ValueError(f"{cls.env_name(f.name)}={raw} must be positive")
            values[f.name] = value
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        """These limits as the environment variables from_env reads (for a gateway child process)."""
        return {self.env_name(f.name): str(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class GatewayConfig:
    triton_url: str = "127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None  # None: no authentication
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    allowed_local_media: Path | None = None  # None: no file paths or file:// URLs
    model_name: str | None = None  # None: asked of the server at start (see app.served_model_name)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    triton_timeout_s: float | None = None  # per request; None: no deadline (the client may disconnect)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits.from_env)
    # The server's request limits, read from the same MEDGEMMA_MAX_* variables the server reads (beside
    # `serve` the gateway inherits its environment), so both refuse the same requests in the same words.
    server_limits: Limits = field(default_factory=Limits.from_env)

    def __post_init__(self):
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("TLS needs both a certificate file and a key file")
        if self.allowed_local_media is not None:
            directory = Path(self.allowed_local_media).resolve()
            if not directory.is_dir():
                raise ValueError(f"--allowed-local-media {self.allowed_local_media} is not a directory")
            object.__setattr__(self, "allowed_local_media", directory)

    @staticmethod
    def api_key_from(value: str | None) -> str | None:
        """The key given on the command line, else $MEDGEMMA_API_KEY (which `ps` does not show)."""
        key = value if value is not None else os.environ.get(API_KEY_ENV)
        return key or None
