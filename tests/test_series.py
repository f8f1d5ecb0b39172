"""DICOM series -> MedGemma 1.5's volume request (client/series.py), on synthetic series written with pydicom.

Expected pixels come from `notebook_rgb` below: the arithmetic of Google's notebook
`notebooks/high_dimensional_ct_hugging_face.ipynb` (Google-Health/medgemma) written out here again, applied to
Hounsfield units the tests compute from the stored values they wrote (stored * slope + intercept).
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medgemma_triton.client import DicomError, load_series, series_messages
from medgemma_triton.client.cli import EXIT_INVALID_ARGUMENT
from medgemma_triton.client.request import build_request
from medgemma_triton.client.series import ct_rgb, mr_rgb, order_slices, read_headers, sample_indices
from medgemma_triton.client.series import _slice_refs
from medgemma_triton.cli import main

ROWS, COLUMNS = 48, 64  # not square: a transposed slice would show
SLOPE, INTERCEPT = 0.5, -1024.0  # a slope other than 1: the windows land right only after the modality LUT
AXIAL = [1, 0, 0, 0, 1, 0]


def notebook_rgb(hu: np.ndarray) -> np.ndarray:
    """The notebook's norm() per window (clip, float32, -= min, /= (max - min), *= 255.0), stacked as R, G, B,
    then np.round(x, 0).astype(np.uint8)."""
    channels = []
    for low, high in ((-1024, 1024), (-135, 215), (0, 80)):
        channel = np.clip(hu, low, high).astype(np.float32)
        channel -= low
        channel /= high - low
        channel *= 255.0
        channels.append(channel)
    return np.round(np.stack(channels, axis=-1), 0).astype(np.uint8)


def pillow_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


def stored_pattern(index: int) -> np.ndarray:
    """A slice whose HU range crosses all three windows and differs from every other slice's."""
    ramp = np.linspace(-1100, 1100, ROWS * COLUMNS).reshape(ROWS, COLUMNS) + 7 * index
    return np.rint((ramp - INTERCEPT) / SLOPE).astype(np.int16)


def hounsfield(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float64) * SLOPE + INTERCEPT


def image_dataset(stored: np.ndarray, *, modality="CT", series_uid="1.2.826.0.1.3680043.8.498.1", description="AXIAL 1mm",
                  instance=None, position=None, orientation=AXIAL, rescale=True) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = modality, series_uid, description
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    ds.PixelData = stored.astype(np.int16).tobytes()
    return ds


def write_series(folder, count: int, *, instance=lambda i: i + 1, position=lambda i: (0, 0, 2.5 * i), **kwargs) -> list[str]:
    """`count` slices, true order 0..count-1, written under shuffled names; returns the paths in true order."""
    os.makedirs(folder, exist_ok=True)
    names = [f"{generate_uid().split('.')[-1]}.dcm" for _ in range(count)]
    random.Random(count).shuffle(names)
    paths = [os.path.join(folder, name) for name in names]
    for i, path in enumerate(paths):
        ds = image_dataset(stored_pattern(i), instance=instance(i), position=position(i), **kwargs)
        ds.save_as(path, enforce_file_format=True)
    return paths


def ordered_paths(folder) -> list[str]:
    headers = read_headers(folder)
    return [ref.path for ref in order_slices([r for path, ds in headers for r in _slice_refs(path, ds)], folder)]


# --- ordering -----------------------------------------------------------------------------------------------


def test_slices_follow_instance_number_not_file_names_or_positions(tmp_path):
    # positions run backwards: only InstanceNumber gives the true order
    paths = write_series(tmp_path, 12, position=lambda i: (0, 0, -2.5 * i))
    assert sorted(paths) != paths
    assert ordered_paths(tmp_path) == paths


@pytest.mark.parametrize(
    "instance", [lambda i: None, lambda i: 1, lambda i: 5 - i % 5], ids=["absent", "all-same", "repeated"]
)
def test_absent_or_repeated_instance_numbers_fall_back_to_position_along_the_normal(tmp_path, instance):
    paths = write_series(tmp_path, 10, instance=instance)
    assert ordered_paths(tmp_path) == paths


def test_position_is_measured_along_the_orientation_normal(tmp_path):
    # sagittal: rows along +y, columns along -z, so the normal is row x column = -x; slices advance along -x,
    # and the z offsets would give the opposite order if position were read as z
    sagittal = [0, 1, 0, 0, 0, -1]
    paths = write_series(
        tmp_path, 8, instance=lambda i: None, position=lambda i: (-3.0 * i, 0, -0.1 * i), orientation=sagittal
    )
    assert ordered_paths(tmp_path) == paths


def test_slices_without_numbers_or_positions_are_refused(tmp_path):
    paths = write_series(tmp_path, 3, instance=lambda i: 1)
    image_dataset(stored_pattern(9), instance=1).save_as(tmp_path / "no_position.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match=r"no_position\.dcm has no Image Position") as refused:
        load_series(tmp_path)
    assert "repeated (1 in" in str(refused.value) and paths[0] in str(refused.value)


# --- sampling -----------------------------------------------------------------------------------------------


def test_sampling_is_the_notebooks_formula():
    # notebook: [dicom_instances[int(round(i /(MAX_SLICE) * (len(dicom_instances)-1)))] for i in range(1, MAX_SLICE + 1)]
    kept = sample_indices(100, 85)
    assert kept == [int(round(i / 85 * 99)) for i in range(1, 86)]
    assert (len(kept), kept[0], kept[1], kept[42], kept[-1]) == (85, 1, 2, 50, 99)  # slice 0 is not sent
    assert all(b > a for a, b in zip(kept, kept[1:]))
    assert sample_indices(10, 4) == [2, 4, 7, 9]  # 2/4 * 9 = 4.5: Python's round goes to even, not up to 5


@pytest.mark.parametrize("count", [1, 84, 85])
def test_up_to_max_slices_every_slice_is_kept(count):
    assert sample_indices(count, 85) == list(range(count))


# --- pixels ---------------------------------------------------------------------------------------------------


def test_ct_windows_match_the_notebooks_arithmetic_on_known_hounsfield_units():
    hu = np.array([[-3000, -1024, -135, 0, 40, 80, 215, 1024, 3000]], dtype=np.float64)
    expected = np.array(
        [[[0, 0, 0], [0, 0, 0], [111, 0, 0], [128, 98, 0], [132, 128, 128], [137, 157, 255], [154, 255, 255],
          [255, 255, 255], [255, 255, 255]]],
        dtype=np.uint8,
    )  # by hand: R = (hu + 1024) / 2048 * 255, G = (hu + 135) / 350 * 255, B = hu / 80 * 255, clipped, rounded
    np.testing.assert_array_equal(ct_rgb(hu), expected)
    dense = np.arange(-1200, 1200, 1 / 64, dtype=np.float64).reshape(-1, 128)  # every rounding boundary, many times
    np.testing.assert_array_equal(ct_rgb(dense), notebook_rgb(dense))
    stored = np.arange(-1000, 5000, dtype=np.int16).reshape(-1, 100)  # no rescale: the stored integers are the HU
    np.testing.assert_array_equal(ct_rgb(stored), notebook_rgb(stored))


def test_a_ct_volume_is_ordered_sampled_windowed_and_jpeg_encoded_like_the_notebook(tmp_path):
    write_series(tmp_path, 100)
    series = load_series(tmp_path)
    assert (series.modality, series.slice_count, series.kept) == ("CT", 100, tuple(sample_indices(100, 85)))
    assert len(series.images) == 85
    for number, (index, jpeg) in enumerate(zip(series.kept, series.images)):
        # the same bytes as Pillow's default JPEG of the expected pixels: right slice, right HU, right windows
        assert jpeg == pillow_jpeg(notebook_rgb(hounsfield(stored_pattern(index)))), f"SLICE {number + 1}"
    decoded = Image.open(io.BytesIO(series.images[0]))
    assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (COLUMNS, ROWS))


def test_max_slices_changes_the_sample(tmp_path):
    write_series(tmp_path, 30)
    assert load_series(tmp_path, max_slices=7).kept == tuple(sample_indices(30, 7))
    assert load_series(tmp_path, max_slices=30).kept == tuple(range(30))


def test_mr_is_scaled_by_the_volume_percentiles_and_grey(tmp_path):
    write_series(tmp_path, 6, modality="MR", rescale=False)
    volume = [stored_pattern(i).astype(np.float64) for i in range(6)]
    low, high = np.percentile(np.concatenate([v.ravel() for v in volume]), (0.5, 99.5))
    for rgb, values in zip(mr_rgb(volume), volume):
        grey = np.clip(values, low, high).astype(np.float32)
        grey -= low
        grey /= high - low
        grey *= 255.0
        grey = np.round(grey, 0).astype(np.uint8)
        np.testing.assert_array_equal(rgb, np.stack([grey] * 3, axis=-1))
    series = load_series(tmp_path)
    assert series.modality == "MR"
    assert series.images[2] == pillow_jpeg(mr_rgb(volume)[2])


# --- multi-frame ------------------------------------------------------------------------------------------------


def enhanced_ct(frames: list[np.ndarray], positions: list[tuple], instance=None) -> Dataset:
    """An enhanced CT file: rescale and orientation shared, positions per frame (functional groups only)."""
    ds = image_dataset(np.stack(frames), rescale=False, instance=instance)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = SLOPE
    shared.PixelValueTransformationSequence[0].RescaleIntercept = INTERCEPT
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = AXIAL
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for position in positions:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = list(position)
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def test_a_multi_frame_file_yields_its_frames_in_order_with_functional_group_rescale(tmp_path):
    # positions run backwards: with an Instance Number, the file's frame order is the order
    frames = [stored_pattern(i) for i in range(5)]
    enhanced = enhanced_ct(frames, [(0, 0, -2.0 * i) for i in range(5)], instance=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    series = load_series(tmp_path)
    assert (series.slice_count, series.kept) == (5, (0, 1, 2, 3, 4))
    for frame, jpeg in zip(frames, series.images):
        assert jpeg == pillow_jpeg(notebook_rgb(hounsfield(frame)))


def test_frames_without_instance_order_use_their_per_frame_positions(tmp_path):
    # two enhanced files without Instance Numbers whose frames interleave along z
    first, second = [stored_pattern(i) for i in (0, 2, 4)], [stored_pattern(i) for i in (1, 3)]
    enhanced_ct(first, [(0, 0, 0.0), (0, 0, 2.0), (0, 0, 4.0)]).save_as(tmp_path / "a.dcm", enforce_file_format=True)
    enhanced_ct(second, [(0, 0, 1.0), (0, 0, 3.0)]).save_as(tmp_path / "b.dcm", enforce_file_format=True)
    series = load_series(tmp_path)
    assert series.slice_count == 5
    for index, jpeg in enumerate(series.images):
        assert jpeg == pillow_jpeg(notebook_rgb(hounsfield(stored_pattern(index))))


# --- refusals ---------------------------------------------------------------------------------------------------


def test_a_folder_mixing_series_is_refused_naming_each(tmp_path):
    write_series(tmp_path, 4, series_uid="1.2.3.4", description="AXIAL 1mm")
    write_series(tmp_path, 2, series_uid="1.2.3.5", description="SCOUT")
    with pytest.raises(DicomError, match="mixes 2 series") as refused:
        load_series(tmp_path)
    message = str(refused.value)
    assert '1.2.3.4 "AXIAL 1mm": 4 files' in message and '1.2.3.5 "SCOUT": 2 files' in message


def test_a_non_dicom_file_is_refused_by_name(tmp_path):
    write_series(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DicomError, match=r"notes\.txt is not a DICOM file"):
        load_series(tmp_path)


def test_a_dicom_file_without_pixels_is_refused_by_name(tmp_path):
    write_series(tmp_path, 3)
    report = image_dataset(stored_pattern(0))
    del report.PixelData
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match=r"report\.dcm is a DICOM file without an image"):
        load_series(tmp_path)


def test_other_modalities_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(DicomError, match="holds no files"):
        load_series(tmp_path)
    write_series(tmp_path / "pet", 2, modality="PT")
    with pytest.raises(DicomError, match="Modality 'PT'"):
        load_series(tmp_path / "pet")


# --- the request --------------------------------------------------------------------------------------------------


def test_messages_alternate_image_and_slice_label_between_instruction_and_question(tmp_path):
    write_series(tmp_path, 3)
    series = load_series(tmp_path)
    messages = series_messages(
        series, "Any liver lesions?", instruction="Review the CT slices below.", system="You are a radiologist."
    )
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]}
    assert messages[1]["role"] == "user"
    content = messages[1]["content"]
    assert content[0] == {"type": "text", "text": "Review the CT slices below."}
    assert content[-1] == {"type": "text", "text": "Any liver lesions?"}
    middle = content[1:-1]
    assert [part["type"] for part in middle] == ["image", "text"] * 3
    assert [part["text"] for part in middle[1::2]] == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert [part["image"] for part in middle[0::2]] == list(series.images)
    assert series_messages(series, "q")[0]["content"][0]["type"] == "image"  # no instruction, no system turn


def test_the_client_sends_every_slice_as_its_jpeg_bytes(tmp_path):
    write_series(tmp_path, 90)
    series = load_series(tmp_path)
    request = build_request(series_messages(series, "Describe."), stream=True)
    assert request.images == list(series.images)  # JPEG goes as given, not re-encoded
    assert request.messages_json.count('{"type": "image"}') == 85
    assert request.messages_json.count('"SLICE ') == 85


def test_cli_refuses_locally_with_exit_2(tmp_path, capsys):
    write_series(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (["--series", str(tmp_path), "q"], "notes.txt is not a DICOM file"),
        (["--series", str(tmp_path), "--image", "x.png", "q"], "--series and --image cannot be combined"),
        (["--max-slices", "10", "q"], "--max-slices applies only with --series"),
    ]
    for argv, message in cases:
        code = main(["chat", "--url", "127.0.0.1:1", *argv])
        err = capsys.readouterr().err
        assert code == EXIT_INVALID_ARGUMENT and message in err and err.count("\n") == 1, err


def test_cli_builds_the_volume_request_before_connecting(tmp_path, capsys):
    write_series(tmp_path, 4)
    code = main(["chat", "--url", "127.0.0.1:1", "--series", str(tmp_path), "--max-slices", "2", "q"])
    assert (code, capsys.readouterr().err) == (3, "error: connection refused at 127.0.0.1:1\n")
