"""Any image a caller holds -> the encoded bytes the `images` input carries.

- PNG and JPEG bytes or files are sent as given (no re-encoding, no quality loss);
- DICOM files, bytes or pydicom Datasets are rendered here (client/dicom.py) to a PNG;
- PIL images and numpy arrays are encoded losslessly to PNG;
- other formats Pillow reads (BMP, TIFF, WebP, ...) are re-encoded losslessly to PNG, so the server
  only needs to decode PNG and JPEG.

numpy arrays are HxW (greyscale), HxWx3 (RGB) or HxWx4 (RGBA), uint8 or uint16.

16-bit pixels (uint16 arrays, PIL "I;16"/"I" images, 16-bit PNG files) are sent as 8 bits per sample,
round(v / 257): a full-range linear map, no windowing. The model reads 8-bit RGB, and the server
reproduces the reference image processor exactly, whose Pillow convert("RGB") clips 16-bit values at
255 (a 12-bit scan comes out white). For a chosen window, send DICOM (client/dicom.py) or window the
array yourself.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medgemma_triton.client.dicom import Window, dicom_to_png, is_dicom
from medgemma_triton.client.errors import InvalidArgumentError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH_OFFSET = 24  # IHDR bit depth: signature 8 + chunk length 4 + type 4 + width 4 + height 4
JPEG_MAGIC = b"\xff\xd8\xff"
# PIL modes a PNG stores exactly; others are converted (see _png_ready)
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


@dataclass(frozen=True)
class DicomImage:
    """A DICOM image with rendering choices, for use wherever an image is accepted.

    `source` is a path, bytes or a pydicom Dataset; `frame` is 0-based (multi-frame files);
    `window` overrides the file's VOI window (modality units, e.g. Window(40, 400) for CT soft tissue).
    """

    source: object
    frame: int = 0
    window: Window | None = None
    voi_index: int = 0


def encode_image(image) -> bytes:
    """Encoded bytes for one image of any supported kind (see the module docstring)."""
    if isinstance(image, DicomImage):
        return dicom_to_png(image.source, frame=image.frame, window=image.window, voi_index=image.voi_index)
    if _is_pydicom_dataset(image):
        return dicom_to_png(image)
    if isinstance(image, Image.Image):
        return _pil_to_png(image)
    if isinstance(image, np.ndarray):
        return _pil_to_png(array_to_pil(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _encoded_bytes(bytes(image), "image bytes")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if isinstance(path, str) and path.startswith(("http://", "https://", "data:")):
            raise InvalidArgumentError(
                f"image {path[:80]!r} is a URL; the client does not fetch URLs: download it and pass the file path or bytes"
            )
        with open(path, "rb") as f:
            return _encoded_bytes(f.read(), path)
    raise InvalidArgumentError(
        f"unsupported image type {type(image).__name__}: pass a PIL image, a path, bytes, a numpy array, "
        "a pydicom Dataset or a DicomImage"
    )


def array_to_pil(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        raise InvalidArgumentError(
            f"numpy image has shape {array.shape}, which looks channels-first; pass HxWxC (e.g. array.transpose(1, 2, 0))"
        )
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidArgumentError(f"numpy image has shape {array.shape}; expected HxW, HxWx3 or HxWx4")
    if array.dtype not in (np.uint8, np.uint16):
        raise InvalidArgumentError(
            f"numpy image has dtype {array.dtype}; expected uint8 or uint16 (scale floats to 0..255 and cast to uint8)"
        )
    if array.dtype == np.uint16:
        array = _sixteen_to_eight(array)
    return Image.fromarray(np.ascontiguousarray(array))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def _is_pydicom_dataset(value) -> bool:
    try:
        from pydicom import Dataset
    except ImportError:  # pydicom is the `client` extra; without it there can be no Dataset to pass
        return False
    return isinstance(value, Dataset)


def _encoded_bytes(data: bytes, name: str) -> bytes:
    if data.startswith(PNG_MAGIC) and data[PNG_BIT_DEPTH_OFFSET : PNG_BIT_DEPTH_OFFSET + 1] != b"\x10":
        return data
    if data.startswith(JPEG_MAGIC):
        return data
    if is_dicom(data):
        return dicom_to_png(data)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # noqa: BLE001 - Pillow plugins raise many types for bad input
        raise InvalidArgumentError(
            f"{name} is not a PNG, JPEG, DICOM or other image Pillow can read, or it is damaged; "
            "pass the image file or its bytes as they are"
        ) from None
    return _pil_to_png(image)


def _png_ready(image: Image.Image) -> Image.Image:
    if image.mode in _PNG_MODES:
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, ... and I (how Pillow may open 16-bit PNGs)
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InvalidArgumentError(
                f"a PIL image in mode {image.mode} has values {values.min()}..{values.max()}, outside 16 bits; "
                "window or scale it to mode 'L' (0..255) first"
            )
        return Image.fromarray(_sixteen_to_eight(values))
    if image.mode == "F":
        raise InvalidArgumentError("a PIL image in mode F (float) has no PNG form; scale it to mode 'L' (0..255) first")
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")  # CMYK, YCbCr, LAB, HSV, PA, ...


def _pil_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    _png_ready(image).save(buffer, format="PNG")
    return buffer.getvalue()
