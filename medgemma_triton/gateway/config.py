"""The gateway's settings, one dataclass shared by the CLI, `serve --openai-port` and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "MEDGEMMA_API_KEY"
DEFAULT_PORT = 9000
DEFAULT_MODEL_NAME = "medgemma-4b-it"
# A request carries at most MEDGEMMA_MAX_IMAGES (4) images of MEDGEMMA_MAX_IMAGE_BYTES (32 MiB)
# each; as base64 that is about 171 MiB. The body is read whole before anything else, so it needs a
# bound of its own; the server's limits still apply to what passes.
DEFAULT_MAX_REQUEST_BYTES = 192 * 2**20


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
