"""Encoded image bytes -> pixel_values, exactly as the checkpoint's Gemma3ImageProcessorPil computes them.

The reference (transformers 5.23, a PIL image given to Gemma3Processor) does, per image:
- RGB: image_transforms.convert_to_rgb - an image with an alpha band ("A" in getbands(): RGBA, LA, PA)
  or a `transparency` entry (P or L with tRNS) is composited onto opaque white; every other mode goes
  through Pillow's convert("RGB") (L, P, CMYK, YCbCr, 1, and I;16 / I / F, which Pillow clips to 0..255,
  so a 16-bit image with values above 255 comes out white: map 16-bit scans to 8 bits before sending);
- resize to (height, width) with the checkpoint's resample filter (Pillow, uint8);
- rescale: uint8 -> float64 * rescale_factor -> float32;
- normalize: (x - mean) / std in float32, per channel.
No EXIF orientation is applied (transformers applies it only to images it loads from URLs or paths).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile

from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.spec import CheckpointError, ImageProcessingSpec, ModelSpec

# Pillow format names; GIF and WEBP decode their first frame
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")


class UnsupportedImageProcessing(CheckpointError, NotImplementedError):
    """The checkpoint's image processor uses a feature this package does not implement."""


def check_image_processing_supported(spec: ModelSpec) -> ImageProcessingSpec:
    """Call at model load: fails on image-processor settings whose output we could not reproduce."""
    processing = spec.image_processing
    if processing is None:
        raise UnsupportedImageProcessing(f"{spec.architecture} has no image processor (text-only checkpoint)")
    if processing.do_pan_and_scan:
        raise UnsupportedImageProcessing(
            "the checkpoint enables pan-and-scan (do_pan_and_scan: true in preprocessor_config.json), which "
            "is not supported; set it to false (the MedGemma model card's default)"
        )
    if not processing.do_resize:
        raise UnsupportedImageProcessing(
            "the checkpoint disables resizing (do_resize: false); the vision encoder needs "
            f"{processing.height}x{processing.width} images"
        )
    if not processing.do_convert_rgb:
        raise UnsupportedImageProcessing(
            "the checkpoint disables RGB conversion (do_convert_rgb: false); the vision encoder needs 3 channels"
        )
    return processing


def _limit(field: str) -> str:
    return Limits.env_name(field)


def _too_large_to_decode(name: str, limits: Limits) -> InvalidRequest:
    return InvalidRequest(
        f"{name} is too large to decode: its header declares over {2 * Image.MAX_IMAGE_PIXELS} pixels; "
        f"the limit is {limits.max_image_pixels} pixels ({_limit('max_image_pixels')})"
    )


def decode_image(data: bytes, limits: Limits, name: str = "image") -> Image.Image:
    """Decode one encoded image fully (no partial decode), checking its size before any pixel is decoded.

    `name` says which image in error messages ("images[1]"). Pillow's own messages are not passed on:
    they name Python objects ("<_io.BytesIO object at 0x...>") and decoder internals.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # Pillow's default is off: a truncated file must fail, not decode gray rows
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was enabled in this process; images would decode partially")
    allowed = ", ".join(ALLOWED_FORMATS)
    if not data:
        raise InvalidRequest(f"{name} is empty (0 bytes); send an encoded {allowed} image")
    if len(data) > limits.max_image_bytes:
        raise InvalidRequest(
            f"{name} is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes "
            f"({_limit('max_image_bytes')})"
        )
    if data[128:132] == b"DICM":
        raise InvalidRequest(f"{name} is DICOM, which the server does not decode; convert it to one of {allowed}")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise _too_large_to_decode(name, limits) from None
    except Exception:  # noqa: BLE001 - Pillow plugins raise many types for bad input
        raise InvalidRequest(
            f"{name} is not a decodable image: it is in none of the supported formats ({allowed}), or its "
            "header is damaged; send it as a PNG or JPEG file"
        ) from None

    width, height = image.size
    if max(width, height) > limits.max_image_side:
        raise InvalidRequest(
            f"{name} is {width}x{height} pixels; the limit is {limits.max_image_side} pixels per side "
            f"({_limit('max_image_side')})"
        )
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(
            f"{name} is {width}x{height} pixels ({width * height}); the limit is {limits.max_image_pixels} "
            f"pixels ({_limit('max_image_pixels')})"
        )
    if width < 1 or height < 1:
        raise InvalidRequest(f"{name} is {width}x{height} pixels; it has no pixels")
    try:
        image.load()
    except Image.DecompressionBombError:
        raise _too_large_to_decode(name, limits) from None
    except Exception:  # noqa: BLE001
        raise InvalidRequest(
            f"{name} is a {image.format} image whose pixel data is corrupt or truncated, or encoded in a way "
            f"the server cannot decode; send the complete file, or re-encode it (supported formats: {allowed})"
        ) from None
    return image


def convert_to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """transformers.image_transforms.convert_to_rgb on a PIL image: transparency composited onto white."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError):
        raise InvalidRequest(
            f"{name} has pixel format {image.mode}, which cannot be converted to RGB; send an 8-bit RGB or "
            f"greyscale image (supported formats: {', '.join(ALLOWED_FORMATS)})"
        ) from None


def preprocess_image(image: Image.Image, spec: ModelSpec, name: str = "image") -> np.ndarray:
    """pixel_values of one image: float32 [3, height, width], as Gemma3ImageProcessorPil computes them."""
    processing = check_image_processing_supported(spec)
    rgb = convert_to_rgb(image, name)
    resized = rgb.resize((processing.width, processing.height), resample=processing.resample)
    pixels = np.asarray(resized).transpose(2, 0, 1)  # HWC uint8 -> CHW
    if processing.do_rescale:
        pixels = (pixels.astype(np.float64) * processing.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if processing.do_normalize:
        mean = np.asarray(processing.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(processing.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels, dtype=np.float32)


def pixel_values_from_bytes(images: list[bytes], spec: ModelSpec, limits: Limits) -> np.ndarray:
    """Decode and preprocess a request's images: float32 [N, 3, height, width] (N may be 0)."""
    processing = check_image_processing_supported(spec)
    if len(images) > limits.max_images:
        raise InvalidRequest(
            f"the request has {len(images)} images; the limit is {limits.max_images} ({_limit('max_images')})"
        )
    pixel_values = np.empty((len(images), 3, processing.height, processing.width), dtype=np.float32)
    for i, data in enumerate(images):
        name = f"images[{i}]"
        pixel_values[i] = preprocess_image(decode_image(data, limits, name), spec, name)
    return pixel_values
