"""DICOM -> PNG on the client, with pydicom: the server only ever sees ordinary image bytes.

Rendering, in DICOM's own order (PS3.3 C.11, C.7.6.3.1.2):
1. decode one frame (`frame`, 0-based; multi-frame files need it, single-frame files have frame 0);
2. greyscale: the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) maps stored
   values to modality units (e.g. Hounsfield units for CT);
3. greyscale: the VOI transform chooses what is visible: an explicit `window`, else the file's VOI LUT
   Sequence, else its Window Center/Width (`voi_index` picks among alternatives), else the frame's
   own min..max;
4. MONOCHROME1 (white = low values, e.g. many CR/DX X-rays) is inverted so that 0 is black;
5. colour (RGB, YBR_* decoded to RGB by pydicom, PALETTE COLOR through its LUT) is scaled from
   Bits Stored to 8 bits per sample.

Output depth: 8 bits per sample by default, after windowing. The window is what makes a 12-16 bit
image readable, and the model sees 8-bit RGB anyway (its image processor rescales 0..255 to 0..1),
so more bits would carry nothing to the model; and the server, like the reference image processor,
converts with Pillow's convert("RGB"), which clips a 16-bit image at 255 instead of scaling it.
`render_dicom(..., bits=16)` keeps 16-bit precision after windowing (a 16-bit greyscale image) for
uses other than sending it to the model; the client always sends the 8-bit rendering.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medgemma_triton.client.errors import InvalidArgumentError

DICM_MAGIC_OFFSET = 128  # 128-byte preamble, then b"DICM" (PS3.10 7.1)
DICM_MAGIC = b"DICM"
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class DicomError(InvalidArgumentError):
    """A DICOM file the client cannot render (compressed without a decoder, no pixels, bad frame...)."""


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (after rescale), as in Window Center (0028,1050) / Width (0028,1051)."""

    center: float
    width: float
    function: str = "LINEAR"  # VOI LUT Function (0028,1056)

    def __post_init__(self):
        if self.function.upper() not in VOI_FUNCTIONS:
            raise ValueError(f"window function {self.function!r} is not one of {', '.join(VOI_FUNCTIONS)}")
        if self.width <= 0 or (self.function.upper() == "LINEAR" and self.width < 1):
            raise ValueError(f"window width {self.width} must be positive (at least 1 for LINEAR)")


def is_dicom(data: bytes) -> bool:
    return data[DICM_MAGIC_OFFSET : DICM_MAGIC_OFFSET + len(DICM_MAGIC)] == DICM_MAGIC


def read_dicom(source):
    """A pydicom Dataset from a Dataset, a path, raw bytes or a binary file object."""
    import pydicom

    if isinstance(source, pydicom.Dataset):
        return source
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "DICOM bytes"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        return pydicom.dcmread(source)
    except (pydicom.errors.InvalidDicomError, EOFError, ValueError) as exc:
        raise DicomError(f"{name} is not a readable DICOM file: {exc}") from None


def render_dicom(source, *, frame: int = 0, window: Window | None = None, voi_index: int = 0, bits: int = 8) -> Image.Image:
    """One frame as a PIL image: mode "L" (bits=8) or "I;16" (bits=16) for greyscale, "RGB" for colour."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    ds = read_dicom(source)
    if "PixelData" not in ds:
        raise DicomError(f"{_describe(ds)} has no pixel data (Pixel Data (7FE0,0010) is absent)")
    stored = _decode_frame(ds, frame)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if stored.ndim != 2:
            raise DicomError(f"{_describe(ds)}: expected one greyscale plane, decoded shape {stored.shape}")
        modality = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        unit = _voi_to_unit(modality, ds, window, voi_index)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        if bits == 8:
            return Image.fromarray(np.rint(unit * 255).astype(np.uint8))
        return Image.fromarray(np.rint(unit * 65535).astype(np.uint16))

    if window is not None:
        raise DicomError(f"{_describe(ds)} is {photometric}: a window applies only to MONOCHROME1/2 images")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
    elif stored.ndim == 3 and stored.shape[-1] == 3:  # RGB, or YBR_* that pydicom converted to RGB
        rgb = stored
        depth = int(ds.BitsStored)
    else:
        raise DicomError(f"{_describe(ds)}: Photometric Interpretation {photometric!r} is not supported")
    # Pillow writes no 16-bit colour PNG, and the model reads 8-bit RGB: colour is always 8-bit
    return Image.fromarray(np.ascontiguousarray(_scale_to_uint8(rgb, depth)))


def dicom_to_png(source, *, frame: int = 0, window: Window | None = None, voi_index: int = 0, bits: int = 8) -> bytes:
    image = render_dicom(source, frame=frame, window=window, voi_index=voi_index, bits=bits)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _describe(ds) -> str:
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename:
        return os.path.basename(filename)
    return "DICOM dataset"


def _number_of_frames(ds) -> int:
    raw = ds.get("NumberOfFrames", 1)
    try:
        return max(int(raw), 1)
    except (TypeError, ValueError):
        raise DicomError(f"{_describe(ds)}: Number of Frames (0028,0008) is {raw!r}, not an integer") from None


def _decode_frame(ds, frame: int) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array

    frames = _number_of_frames(ds)
    if not 0 <= frame < frames:
        raise DicomError(f"{_describe(ds)} has {frames} frame(s) (0..{frames - 1}); frame {frame} was requested")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise DicomError(f"{_describe(ds)} has no Transfer Syntax UID (0002,0010): its pixel encoding is unknown")
    if syntax.is_compressed:
        decoder = get_decoder(syntax)
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
            raise DicomError(
                f"{_describe(ds)}: pixel data is compressed as {syntax.name} ({syntax}), which this client cannot "
                f"decode (needs one of: {needs}); install one or convert the file to an uncompressed "
                f"transfer syntax, e.g. `gdcmconv --raw in.dcm out.dcm`"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about harmless header quirks
            return pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as exc:  # decoders raise many types; the transfer syntax is what the user can act on
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise DicomError(f"{_describe(ds)}: cannot decode pixel data ({syntax.name}, {syntax}): {detail}") from exc


def _voi_to_unit(modality: np.ndarray, ds, window: Window | None, voi_index: int) -> np.ndarray:
    """Modality values -> visible intensity in [0, 1]."""
    from pydicom.pixels import apply_voi

    if window is None and "VOILUTSequence" in ds:
        lut_item = ds.VOILUTSequence[voi_index]
        lut_bits = int(lut_item.LUTDescriptor[2])
        values = apply_voi(np.rint(modality).astype(np.int64), ds, index=voi_index)
        return np.clip(np.asarray(values, dtype=np.float64) / (2**lut_bits - 1), 0.0, 1.0)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = Window(
            center=_pick(ds.WindowCenter, voi_index),
            width=_pick(ds.WindowWidth, voi_index),
            function=str(ds.get("VOILUTFunction", "LINEAR")),
        )
    if window is not None:
        return _apply_window(modality, window)
    low, high = float(modality.min()), float(modality.max())
    if high == low:
        return np.zeros_like(modality)
    return (modality - low) / (high - low)


def _pick(value, index: int) -> float:
    try:
        return float(value[index])
    except TypeError:  # a single value (VM 1)
        return float(value)


def _apply_window(modality: np.ndarray, window: Window) -> np.ndarray:
    """pydicom's windowing (PS3.3 C.11.2.1.2) with a fixed output range, 16-bit unsigned, scaled to [0, 1]."""
    from pydicom import Dataset
    from pydicom.pixels import apply_windowing

    # apply_windowing maps onto the output range of the dataset it is given; this one has no rescale
    # and unsigned 16-bit stored values, so that range is exactly 0..65535.
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored = 16
    voi.PixelRepresentation = 0
    voi.WindowCenter = window.center
    voi.WindowWidth = window.width
    voi.VOILUTFunction = window.function.upper()
    return apply_windowing(modality, voi) / 65535.0


def _scale_to_uint8(samples: np.ndarray, depth: int) -> np.ndarray:
    if depth <= 8 and samples.dtype == np.uint8:
        return samples
    full_scale = float(2**depth - 1)
    return np.rint(np.clip(samples.astype(np.float64) / full_scale, 0.0, 1.0) * 255).astype(np.uint8)
