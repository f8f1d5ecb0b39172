"""A folder of DICOM files of one CT or MR series -> the many-image request MedGemma 1.5's volume recipe expects.

The recipe is Google's notebook `notebooks/high_dimensional_ct_hugging_face.ipynb` (Google-Health/medgemma):
1. instances in InstanceNumber order;
2. more than 85: keep instance round(i / 85 * (n - 1)) for i = 1..85 (Python's round; the first
   instance is kept only when rounding lands on it);
3. stored values -> Hounsfield units through the Modality LUT (pydicom's apply_modality_lut, which the
   notebook calls by its alias apply_rescale);
4. three windows as R, G, B: (-1024, 1024), (-135, 215), (0, 80) HU, each clipped, shifted, divided by
   its width and multiplied by 255 in float32, then rounded (half to even) to uint8;
5. each slice JPEG-encoded with Pillow's defaults;
6. one user turn: the instruction text, then per slice its image and the text "SLICE k" (k from 1), then
   the question.

What the notebook does not cover, and what this module does there:
- InstanceNumber absent or repeated: slices go in order of their position along the slice normal
  (Image Position (Patient) . (row x column direction cosines of Image Orientation (Patient)));
- multi-frame files (enhanced CT/MR) contribute their frames in frame order, with per-frame positions
  and rescale from the functional groups;
- MR: no MR recipe from Google was found (its volume notebook is for CT); each volume is scaled from its
  0.5th to its 99.5th percentile (over the slices sent) to 0..255 with the same arithmetic as a CT window,
  and replicated to R, G, B.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medgemma_triton.client.dicom import DicomError, _decode_frame

DEFAULT_MAX_SLICES = 85  # the notebook's MAX_SLICE
CT_WINDOWS_HU = ((-1024, 1024), (-135, 215), (0, 80))  # R wide, G soft tissue, B brain (the notebook's)
MR_PERCENTILES = (0.5, 99.5)
SLICE_LABEL = "SLICE {}"  # the notebook's text after each slice image, numbered from 1
MODALITIES = ("CT", "MR")
HEADER_DEFER_BYTES = 4096  # larger elements (pixel data) are read only for the slices that are sent
ORIENTATION_TOLERANCE = 1e-3  # |normal . normal| may differ from 1 by this much and still count as one plane


@dataclass(frozen=True)
class SliceRef:
    """One slice of the series: a single-frame file (`frame` None) or one frame of a multi-frame file."""

    path: str
    frame: int | None
    instance_number: int | None
    position: tuple[float, ...] | None  # Image Position (Patient), mm
    orientation: tuple[float, ...] | None  # Image Orientation (Patient): row then column direction cosines


@dataclass(frozen=True)
class Series:
    """The slices of one series as MedGemma 1.5 reads them: one JPEG per sent slice, in order."""

    uid: str
    description: str
    modality: str
    slice_count: int  # slices in the folder, before sampling
    kept: tuple[int, ...]  # which of the ordered slices were sent (0-based)
    images: tuple[bytes, ...]  # JPEG, one per kept slice


def load_series(folder, max_slices: int = DEFAULT_MAX_SLICES) -> Series:
    """Read the DICOM files of one CT or MR series in `folder` into the images of the volume recipe."""
    if max_slices < 1:
        raise ValueError(f"max_slices is {max_slices}; it must be at least 1")
    headers = read_headers(folder)
    uid = _single_series_uid(headers, folder)
    modality = _series_modality(headers, folder)
    slices = order_slices([ref for path, ds in headers for ref in _slice_refs(path, ds)], folder)
    kept = sample_indices(len(slices), max_slices)
    values = modality_values([slices[i] for i in kept])
    # CT slices are windowed one at a time; MR needs the whole volume for its percentiles
    rgb = (ct_rgb(hu) for hu in values) if modality == "CT" else mr_rgb(list(values))
    first = headers[0][1]
    return Series(
        uid=uid,
        description=str(first.get("SeriesDescription", "")),
        modality=modality,
        slice_count=len(slices),
        kept=tuple(kept),
        images=tuple(encode_jpeg(image) for image in rgb),
    )


def series_messages(
    series: Series, prompt: str, *, instruction: str | None = None, system: str | None = None
) -> list[dict]:
    """Chat messages for `MedGemmaClient.chat`: [system], user: [instruction], (image, "SLICE k")..., prompt."""
    content = [] if instruction is None else [{"type": "text", "text": instruction}]
    for number, image in enumerate(series.images, 1):
        content.append({"type": "image", "image": image})
        content.append({"type": "text", "text": SLICE_LABEL.format(number)})
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages.append({"role": "user", "content": content})
    return messages


def sample_indices(count: int, max_slices: int = DEFAULT_MAX_SLICES) -> list[int]:
    """The notebook's uniform sampling: all slices up to `max_slices`, else round(i / max * (n - 1)), i = 1..max."""
    if count <= max_slices:
        return list(range(count))
    return [int(round(i / max_slices * (count - 1))) for i in range(1, max_slices + 1)]


def read_headers(folder) -> list[tuple[str, object]]:
    """(path, dataset without its pixel data read) for every file in `folder`, sorted by name."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DicomError(f"{folder} is not a folder; pass the folder that holds one series' DICOM files")
    # hidden files are the file system's own (.DS_Store, ._*), never a slice
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DicomError(f"{folder} holds no files; pass the folder that directly holds one series' DICOM files")
    return [(path, _read_header(path)) for path in (os.path.join(folder, n) for n in names)]


def _read_header(path: str):
    import pydicom

    try:
        ds = pydicom.dcmread(path, defer_size=HEADER_DEFER_BYTES)
    except (pydicom.errors.InvalidDicomError, EOFError, ValueError):
        raise DicomError(
            f"{path} is not a DICOM file; a series folder must hold only that series' DICOM files: move it out"
        ) from None
    if "PixelData" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP Class UID"
        raise DicomError(f"{path} is a DICOM file without an image ({kind}); move it out of the series folder")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path} has Photometric Interpretation {photometric or '(absent)'}; "
            "CT and MR slices are greyscale (MONOCHROME1/2)"
        )
    return ds


def _single_series_uid(headers, folder) -> str:
    uids = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    if len(uids) == 1:
        return next(iter(uids))
    descriptions = {str(ds.get("SeriesInstanceUID", "")): str(ds.get("SeriesDescription", "")) for _, ds in headers}
    found = "; ".join(
        f"{uid or '(no Series Instance UID)'} \"{descriptions[uid]}\": {count} file{'s' if count > 1 else ''}"
        for uid, count in uids.most_common()
    )
    raise DicomError(
        f"{os.fspath(folder)} mixes {len(uids)} series: {found}; put each series in its own folder and pass one"
    )


def _series_modality(headers, folder) -> str:
    modality = str(headers[0][1].get("Modality", "")).upper()
    if modality not in MODALITIES:
        raise DicomError(
            f"the series in {os.fspath(folder)} is Modality {modality or '(absent)'!r}; "
            f"volumes are read for {' and '.join(MODALITIES)} only"
        )
    return modality


def _slice_refs(path: str, ds) -> list[SliceRef]:
    number = ds.get("InstanceNumber")
    number = int(number) if number not in (None, "") else None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        return [SliceRef(path, None, number, _floats(ds, "ImagePositionPatient"), _floats(ds, "ImageOrientationPatient"))]
    return [
        SliceRef(path, frame, number, _frame_floats(ds, frame, "PlanePositionSequence", "ImagePositionPatient"),
                 _frame_floats(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"))
        for frame in range(frames)
    ]


def _floats(ds, keyword: str) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    return tuple(float(v) for v in value) if value else None


def _frame_group(ds, frame: int, sequence: str):
    """The first item of a functional group macro for one frame: per-frame first, else shared (PS3.3 C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and index < len(items) and items[index].get(sequence):
            return items[index].get(sequence)[0]
    return None


def _frame_floats(ds, frame: int, sequence: str, keyword: str) -> tuple[float, ...] | None:
    item = _frame_group(ds, frame, sequence)
    return _floats(item, keyword) if item is not None else _floats(ds, keyword)


def order_slices(slices: list[SliceRef], folder="the series") -> list[SliceRef]:
    """InstanceNumber order (frames of one file in frame order); by position along the normal where numbers
    are absent or repeated."""
    numbers = {s.path: s.instance_number for s in slices}
    if None not in numbers.values() and len(set(numbers.values())) == len(numbers):
        return sorted(slices, key=lambda s: (s.instance_number, s.frame or 0))
    return sorted(slices, key=_position_key(slices, numbers, folder))


def _position_key(slices: list[SliceRef], numbers: dict, folder):
    missing = next((s for s in slices if s.position is None or s.orientation is None), None)
    if missing is not None:
        raise DicomError(
            f"cannot order the slices of {os.fspath(folder)}: Instance Number is {_number_problem(numbers)}, and "
            f"{missing.path} has no Image Position/Orientation (Patient) to order by; "
            "pass a series with either unique Instance Numbers or slice positions"
        )
    normal = _normal(slices[0].orientation)
    for s in slices:
        if abs(abs(float(np.dot(normal, _normal(s.orientation)))) - 1.0) > ORIENTATION_TOLERANCE:
            raise DicomError(
                f"cannot order the slices of {os.fspath(folder)} by position: {s.path} lies in another plane "
                f"than {slices[0].path} (Image Orientation (Patient) differs); pass one stack of parallel slices"
            )
    return lambda s: (float(np.dot(s.position, normal)), s.path, s.frame or 0)


def _number_problem(numbers: dict) -> str:
    absent = next((path for path, number in numbers.items() if number is None), None)
    if absent is not None:
        return f"absent in {absent}"
    repeated = Counter(numbers.values()).most_common(1)[0][0]
    return f"repeated ({repeated} in {', '.join(p for p, n in numbers.items() if n == repeated)})"


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:6], dtype=np.float64))


def modality_values(slices: list[SliceRef]):
    """Each slice's pixels in modality units (Hounsfield units for CT), decoded only now."""
    from pydicom.pixels import apply_modality_lut

    path, ds = None, None
    for ref in slices:
        if ref.path != path:  # frames of one file come together: read each file once, hold one at a time
            path, ds = ref.path, _read_pixels(ref.path)
        stored = _decode_frame(ds, ref.frame or 0)
        yield np.asarray(apply_modality_lut(stored, _rescale_source(ds, ref.frame)))


def _read_pixels(path: str):
    import pydicom

    return pydicom.dcmread(path)


def _rescale_source(ds, frame: int | None):
    """The dataset holding the Modality LUT or Rescale Slope/Intercept for this frame: enhanced multi-frame
    files keep them in the Pixel Value Transformation functional group, which apply_modality_lut does not read."""
    from pydicom import Dataset

    if frame is None or "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
        return ds
    item = _frame_group(ds, frame, "PixelValueTransformationSequence")
    if item is None or "RescaleSlope" not in item or "RescaleIntercept" not in item:
        return ds
    rescale = Dataset()
    rescale.RescaleSlope = item.RescaleSlope
    rescale.RescaleIntercept = item.RescaleIntercept
    return rescale


def ct_rgb(hu: np.ndarray) -> np.ndarray:
    """HxW Hounsfield units -> HxWx3 uint8: the notebook's three windows as R, G, B."""
    return np.stack([scale_to_uint8(hu, low, high) for low, high in CT_WINDOWS_HU], axis=-1)


def mr_rgb(volume: list[np.ndarray]) -> list[np.ndarray]:
    """MR slices -> HxWx3 uint8: one 0.5..99.5 percentile range for the whole volume, grey in R, G and B."""
    low, high = (float(v) for v in np.percentile(np.concatenate([s.ravel() for s in volume]), MR_PERCENTILES))
    if high <= low:  # a constant volume: any positive width maps it to black instead of dividing by zero
        high = low + 1.0
    return [np.repeat(scale_to_uint8(s, low, high)[..., None], 3, axis=-1) for s in volume]


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The notebook's window arithmetic, in its order: clip, float32, - low, / (high - low), * 255, round half even."""
    # float64 before clipping: exact for any stored or rescaled value, and negative bounds fit unsigned input
    scaled = np.clip(np.asarray(values, dtype=np.float64), low, high).astype(np.float32)
    scaled -= low
    scaled /= high - low
    scaled *= 255.0
    return np.round(scaled, 0).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """JPEG by Pillow's defaults, as the notebook encodes each slice."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()
