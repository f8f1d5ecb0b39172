"""Client-side DICOM rendering (client/dicom.py) on the sample files pydicom ships.

Expected pixels are computed here from the stored values and the DICOM formulas (PS3.3 C.11.1 rescale,
C.11.2.1.2.1 LINEAR window), independently of the code under test.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder

from medgemma_triton.client import DicomError, DicomImage, Window, dicom_to_png, encode_image, render_dicom


def sample(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom no longer ships {name}"
    return path


def read(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(sample(name))


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR) onto [0, 1]."""
    c, w = center - 0.5, width - 1.0
    out = ((values - c) / w + 0.5).clip(0.0, 1.0)
    out[values <= c - w / 2] = 0.0
    out[values > c + w / 2] = 1.0
    return out


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def test_ct_rescale_then_explicit_window_in_hounsfield_units():
    ds = read("CT_small.dcm")
    assert float(ds.RescaleIntercept) != 0  # the window only lands right if the rescale was applied
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint(linear_window(hu, 40, 400) * 255)
    image = render_dicom(sample("CT_small.dcm"), window=Window(40, 400))
    assert image.mode == "L" and image.size == (ds.Columns, ds.Rows)
    np.testing.assert_array_equal(pixels(image), expected)


def test_ct_without_window_maps_the_frame_range_to_black_white():
    ds = read("CT_small.dcm")
    assert "WindowCenter" not in ds
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    np.testing.assert_array_equal(pixels(render_dicom(sample("CT_small.dcm"))), expected)


def test_mr_uses_the_files_window():
    ds = read("MR_small.dcm")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.rint(linear_window(ds.pixel_array.astype(np.float64), center, width) * 255)
    np.testing.assert_array_equal(pixels(render_dicom(ds)), expected)


def test_sixteen_bit_output_keeps_the_windowed_precision():
    ds = read("MR_small.dcm")
    expected = np.rint(linear_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)) * 65535)
    image = render_dicom(ds, bits=16)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(pixels(image), expected)
    assert len(np.unique(pixels(image))) > len(np.unique(pixels(render_dicom(ds))))


def test_monochrome1_is_inverted_after_rescale_and_window():
    ds = read("6154")  # a MONOCHROME1 CR with Rescale Slope 0.684 and a window
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((1.0 - linear_window(values, float(ds.WindowCenter), float(ds.WindowWidth))) * 255)
    np.testing.assert_array_equal(pixels(render_dicom(sample("6154"))), expected)


def test_multi_frame_picks_the_requested_frame():
    ds = read("SC_rgb_rle_2frame.dcm")
    frames = ds.pixel_array
    assert frames.shape[0] == 2 and not np.array_equal(frames[0], frames[1])
    for frame in (0, 1):
        image = render_dicom(sample("SC_rgb_rle_2frame.dcm"), frame=frame)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), frames[frame])


def test_multi_frame_greyscale_frame_uses_its_own_range():
    ds = read("rtdose.dcm")
    frame = ds.pixel_array[7].astype(np.float64)
    expected = np.rint((frame - frame.min()) / (frame.max() - frame.min()) * 255)
    np.testing.assert_array_equal(pixels(render_dicom(ds, frame=7)), expected)


def test_frame_out_of_range_is_refused_with_the_count():
    with pytest.raises(DicomError, match=r"has 2 frame\(s\) \(0\.\.1\); frame 2 was requested"):
        render_dicom(sample("SC_rgb_rle_2frame.dcm"), frame=2)


def test_rgb_passes_through():
    ds = read("examples_rgb_color.dcm")
    image = render_dicom(ds)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), ds.pixel_array)


def test_ybr_jpeg_is_converted_to_rgb_by_pydicom():
    ds = read("SC_rgb_jpeg_dcmtk.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL"
    np.testing.assert_array_equal(np.asarray(render_dicom(ds)), ds.pixel_array)


def test_sixteen_bit_rgb_is_scaled_to_eight_bits():
    ds = read("SC_rgb_rle_16bit.dcm")
    expected = np.rint(ds.pixel_array.astype(np.float64) / 65535 * 255)
    np.testing.assert_array_equal(pixels(render_dicom(ds)), expected)


def test_rle_compressed_renders_like_the_uncompressed_original():
    np.testing.assert_array_equal(
        np.asarray(render_dicom(sample("MR_small_RLE.dcm"))), np.asarray(render_dicom(sample("MR_small.dcm")))
    )


def test_compressed_without_a_decoder_is_refused_naming_the_transfer_syntax():
    ds = read("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed here")
    with pytest.raises(DicomError, match=r"compressed as JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\.4\.80\)"):
        render_dicom(ds)


def test_a_decoder_that_fails_is_reported_with_the_transfer_syntax():
    with pytest.raises(DicomError, match=r"JPEG Extended \(Process 2 and 4\)"):
        render_dicom(sample("JPEG-lossy.dcm"))  # 12-bit JPEG: Pillow is available but cannot decode it


def test_png_roundtrip_and_auto_detection_from_path_and_bytes():
    png = dicom_to_png(sample("MR_small.dcm"))
    assert png.startswith(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(decoded, np.asarray(render_dicom(sample("MR_small.dcm"))))
    with open(sample("MR_small.dcm"), "rb") as f:
        raw = f.read()
    assert encode_image(sample("MR_small.dcm")) == png
    assert encode_image(raw) == png
    assert encode_image(read("MR_small.dcm")) == png
    assert encode_image(DicomImage(sample("SC_rgb_rle_2frame.dcm"), frame=1)) == dicom_to_png(
        sample("SC_rgb_rle_2frame.dcm"), frame=1
    )


def test_window_is_validated():
    with pytest.raises(ValueError, match="window width"):
        Window(40, 0)
    with pytest.raises(ValueError, match="window function"):
        Window(40, 400, "CUBIC")
    with pytest.raises(DicomError, match="applies only to MONOCHROME"):
        render_dicom(sample("examples_rgb_color.dcm"), window=Window(40, 400))
