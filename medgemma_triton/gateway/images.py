"""A request's encoded image -> the bytes sent to the server, or a refusal in the caller's terms.

Taken: PNG and JPEG (sent as they are), the other formats the server decodes (runtime.images.
ALLOWED_FORMATS), converted losslessly to PNG as the Python client does, and DICOM, rendered to PNG
by the client's renderer. Pillow opens only those formats here, so no other decoder (SVG, EPS, PSD,
...) runs on a caller's bytes. A refusal names the message part, the format and what is taken; it
never quotes a Python repr or exception type, which mean nothing to an HTTP caller.
"""

from __future__ import annotations

import io
import logging

from PIL import Image

from medgemma_triton.client.dicom import DicomError, dicom_to_png, is_dicom
from medgemma_triton.client.errors import InvalidArgumentError
from medgemma_triton.client.images import encode_image
from medgemma_triton.gateway.errors import invalid
from medgemma_triton.runtime.images import ALLOWED_FORMATS

log = logging.getLogger("medgemma_triton.gateway")

SUPPORTED = f"{', '.join(ALLOWED_FORMATS)} or DICOM"
SENT_AS_IS = ("PNG", "JPEG")  # client.images sends these unchanged; the server decodes them itself


def server_image(data: bytes, where: str) -> bytes:
    """The encoded image the server is sent for `data`, the image at `where` ("messages[0].content[1]")."""
    if is_dicom(data):
        return _rendered_dicom(data, where)
    image = _opened(data, where)
    try:
        return encode_image(data if image.format in SENT_AS_IS else image)
    except InvalidArgumentError as exc:  # the client's own refusals are worded for callers
        raise _refusal(f"{where} ({image.format}): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types for bad input
        log.info("%s: converting a %s image failed (%s)", where, image.format, type(exc).__name__)
        raise _refusal(f"{where} is a {image.format} image that cannot be decoded (corrupt or truncated)") from None


def _opened(data: bytes, where: str) -> Image.Image:
    """`data` opened (its header read, no pixels decoded) by one of the allowed formats' decoders."""
    if _looks_like_svg(data):
        raise _refusal(f"{where} is an SVG image, which is not supported: send {SUPPORTED}")
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _refusal(f"{where} has too many pixels to decode: {exc}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for bytes it cannot identify
        raise _refusal(f"{where} is not an image in a supported format, or is corrupt: send {SUPPORTED}") from None


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head)


def _rendered_dicom(data: bytes, where: str) -> bytes:
    try:
        return dicom_to_png(data)
    except DicomError as exc:
        if exc.__cause__ is None:  # the renderer's own words; one raised from another error quotes pydicom's
            raise _refusal(f"{where}: {exc}") from None
        failure = exc.__cause__
    except ImportError:  # pydicom is the `client` extra's; the gateway's does not carry it
        raise _refusal(f"{where} is DICOM, which this gateway cannot render (pydicom is not installed): "
                       "send PNG or JPEG, or install medgemma-triton[client] beside the gateway") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for malformed files
        failure = exc
    log.info("%s: rendering a DICOM image failed (%s)", where, type(failure).__name__)
    raise _refusal(f"{where} is a DICOM file that cannot be rendered (a malformed header field or pixel data): "
                   "convert it to PNG, or check it with a DICOM validator")


def _refusal(message: str):
    return invalid(message, param="messages", code="invalid_image")
