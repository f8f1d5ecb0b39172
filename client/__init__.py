"""Python client for the `medgemma` model (tritonclient gRPC; no torch).

    from medgemma_triton.client import MedGemmaClient
    with MedGemmaClient("127.0.0.1:8001") as client:
        print(client.chat([{"role": "user", "content": "Hello"}]).text)
"""

from medgemma_triton.client.aio import AsyncChatStream, AsyncMedGemmaClient
from medgemma_triton.client.dicom import DicomError, Window, dicom_to_png, render_dicom
from medgemma_triton.client.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    MedGemmaError,
    ModelNotReadyError,
    ServerBusyError,
    ServerError,
    UnavailableError,
)
from medgemma_triton.client.images import DicomImage, encode_image
from medgemma_triton.client.request import build_request
from medgemma_triton.client.response import ChatResult
from medgemma_triton.client.series import Series, load_series, series_messages
from medgemma_triton.client.sync import ChatStream, MedGemmaClient

__all__ = [
    "AsyncChatStream",
    "AsyncMedGemmaClient",
    "CancelledError",
    "ChatResult",
    "ChatStream",
    "DeadlineExceededError",
    "DicomError",
    "DicomImage",
    "InvalidArgumentError",
    "MedGemmaClient",
    "MedGemmaError",
    "ModelNotReadyError",
    "ServerBusyError",
    "Series",
    "ServerError",
    "UnavailableError",
    "Window",
    "build_request",
    "dicom_to_png",
    "encode_image",
    "load_series",
    "render_dicom",
    "series_messages",
]
