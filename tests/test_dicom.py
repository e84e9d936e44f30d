"""read_image on DICOM: films built with pydicom from real NIH PNGs must come back as the PNG's pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from conftest import dicom_dataset
from cxr.images import (
    CorruptImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnsupportedImageError,
    read_image,
)

FILM = "00000493_000.png"  # values 6..232: a stretched or unwindowed film would not match
TOL = 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def png(images_512: Path) -> np.ndarray:
    with Image.open(images_512 / FILM) as im:
        return np.asarray(im)


def _write(ds: Dataset, path: Path, **kw) -> Path:
    ds.save_as(path, enforce_file_format=not kw, **kw)
    return path


# ------------------------------------------------------------------------------ pixels come back right


def test_monochrome2_8bit_equals_the_png(png, tmp_path):
    path = _write(dicom_dataset(png), tmp_path / "film.dcm")
    gray = read_image(path)
    assert gray.dtype == np.float32 and gray.shape == png.shape
    np.testing.assert_allclose(gray, png / 255, atol=1e-6)  # not stretched to the 6..232 it uses
    np.testing.assert_array_equal(read_image(path.read_bytes()), gray)


def test_monochrome1_is_inverted(png, tmp_path):
    path = _write(dicom_dataset(255 - png, "MONOCHROME1"), tmp_path / "inverted.dcm")
    np.testing.assert_allclose(read_image(path), png / 255, atol=1e-6)


def test_rescale_slope_intercept_is_applied_before_the_window(png, tmp_path):
    # stored * 0.1 - 10 gives back the PNG's values; a window of 256 centred on 128 maps them onto [0, 1].
    # Skipping the rescale would saturate every pixel at white.
    stored = png.astype(np.uint16) * 10 + 100
    ds = dicom_dataset(stored, bits=16, RescaleSlope=0.1, RescaleIntercept=-10, WindowCenter=128, WindowWidth=256)
    np.testing.assert_allclose(read_image(_write(ds, tmp_path / "rescaled.dcm")), png / 255, atol=TOL)


@pytest.mark.parametrize("function, center, width", [("LINEAR", 2040.5, 4081), ("LINEAR_EXACT", 2040, 4080)])
def test_window_center_width_on_12_bit_data(function, center, width, png, tmp_path):
    stored = png.astype(np.uint16) * 16  # 12 bits stored in 16
    ds = dicom_dataset(stored, bits=12, WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
    np.testing.assert_allclose(read_image(_write(ds, tmp_path / "window.dcm")), png / 255, atol=TOL)
    ds.PhotometricInterpretation = "MONOCHROME1"  # the window comes first, then the inversion
    np.testing.assert_allclose(read_image(_write(ds, tmp_path / "window1.dcm")), 1 - png / 255, atol=TOL)


def test_window_with_several_views_uses_the_first(png, tmp_path):
    ds = dicom_dataset(png.astype(np.uint16) * 16, bits=12, WindowCenter=[2040.5, 100], WindowWidth=[4081, 10])
    np.testing.assert_allclose(read_image(_write(ds, tmp_path / "views.dcm")), png / 255, atol=TOL)


@pytest.mark.parametrize("lut_bits", [8, 16])
def test_voi_lut_sequence_maps_back_to_the_png(lut_bits, png, tmp_path):
    # Stored values 5 + 100 * v; a LUT of 25,501 entries starting at 5 maps each back to v (scaled to its
    # bits). An 8-bit LUT this long is where pydicom 3.0's own apply_voi goes wrong.
    stored = png.astype(np.uint16) * 100 + 5
    entries = np.arange(255 * 100 + 1) // 100
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(entries), 5, lut_bits])
    if lut_bits == 8:
        item.add_new("LUTData", "US", entries.tolist())
    else:  # the OW form: raw little-endian words
        item.add_new("LUTData", "OW", (entries * 257).astype("<u2").tobytes())
    # A window is present too and would give a different picture: the LUT must win, as the standard says.
    ds = dicom_dataset(stored, bits=16, VOILUTSequence=Sequence([item]), WindowCenter=5000, WindowWidth=100)
    np.testing.assert_allclose(read_image(_write(ds, tmp_path / "lut.dcm")), png / 255, atol=TOL)


def test_deep_film_without_voi_is_stretched_min_max(png, tmp_path):
    stored = png.astype(np.uint16) * 100 + 1000
    expected = (png - png.min()) / (png.max() - png.min())
    np.testing.assert_allclose(read_image(_write(dicom_dataset(stored, bits=16), tmp_path / "raw.dcm")), expected, atol=1e-5)


def test_rgb_dicom_becomes_luminance(png, tmp_path):
    rgb = np.dstack([png, 255 - png, png // 2])
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    gray = read_image(_write(dicom_dataset(rgb, "RGB"), tmp_path / "colour.dcm"))
    assert gray.ndim == 2
    np.testing.assert_allclose(gray, expected, atol=1e-5)


def test_palette_colour_dicom_becomes_luminance(png, tmp_path):
    ds = dicom_dataset(png, "PALETTE COLOR")
    ramp = (np.arange(256) * 257).astype("<u2")  # 16-bit palette entries
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1]), ("Blue", ramp)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut.tobytes())
    expected = (0.299 * png + 0.587 * (255 - png) + 0.114 * png) / 255
    np.testing.assert_allclose(read_image(_write(ds, tmp_path / "palette.dcm")), expected, atol=1e-5)


def test_file_without_preamble_is_read(png, tmp_path):
    ds = dicom_dataset(png)
    del ds.file_meta
    path = _write(ds, tmp_path / "bare", implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(path), png / 255, atol=1e-6)


# --------------------------------------------------------------------------------------- compression


def test_rle_lossless_decodes_to_the_same_pixels(png, tmp_path):
    ds = dicom_dataset(png.astype(np.uint16) * 16, bits=12, WindowCenter=2040.5, WindowWidth=4081)
    plain = read_image(_write(ds, tmp_path / "plain.dcm"))
    ds.compress(RLELossless)
    path = _write(ds, tmp_path / "rle.dcm")
    assert path.stat().st_size < (tmp_path / "plain.dcm").stat().st_size
    np.testing.assert_array_equal(read_image(path), plain)


def test_jpeg_baseline_decodes_like_pillow(png, tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(png).save(jpeg, "JPEG", quality=90)
    ds = dicom_dataset(None, Rows=png.shape[0], Columns=png.shape[1], SamplesPerPixel=1, BitsAllocated=8, BitsStored=8,
                  HighBit=7, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    gray = read_image(_write(ds, tmp_path / "jpeg.dcm"))
    with Image.open(jpeg) as im:
        by_pillow = np.asarray(im) / 255
    assert np.abs(gray - by_pillow).max() <= 2 / 255  # two JPEG decoders may round differently


def test_colour_jpeg_dicom_becomes_luminance(png, tmp_path):
    rgb = np.dstack([png, 255 - png, png // 2])
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG", quality=95)  # stored as YCbCr, which pydicom turns back into RGB
    ds = dicom_dataset(None, Rows=png.shape[0], Columns=png.shape[1], SamplesPerPixel=3, PlanarConfiguration=0,
                  BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0,
                  PhotometricInterpretation="YBR_FULL_422")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    gray = read_image(_write(ds, tmp_path / "colour-jpeg.dcm"))
    with Image.open(jpeg) as im:
        decoded = np.asarray(im).astype(np.float64)
    expected = (0.299 * decoded[..., 0] + 0.587 * decoded[..., 1] + 0.114 * decoded[..., 2]) / 255
    assert gray.ndim == 2 and np.abs(gray - expected).max() <= 2 / 255


def test_missing_decoder_says_what_to_install(png, tmp_path):
    if get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here, so nothing is missing")
    ds = dicom_dataset(png)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    path = _write(ds, tmp_path / "htj2k.dcm")
    with pytest.raises(UnsupportedImageError, match="pip install pylibjpeg pylibjpeg-openjpeg") as caught:
        read_image(path)
    assert str(path) in str(caught.value) and "no decoder" in str(caught.value)


# ------------------------------------------------------------------------------------------- refusals


def test_multi_frame_is_refused(png, tmp_path):
    path = _write(dicom_dataset(np.stack([png, png, 255 - png])), tmp_path / "cine.dcm")
    with pytest.raises(UnsupportedImageError, match="3 frames") as caught:
        read_image(path)
    assert str(path) in str(caught.value)


def test_dicom_without_pixel_data_is_refused(tmp_path):
    ds = dicom_dataset(None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage  # a report: no image expected
    path = _write(ds, tmp_path / "report.dcm")
    with pytest.raises(NotAnImageError, match="no Pixel Data") as caught:
        read_image(path)
    assert str(path) in str(caught.value)


def test_header_size_is_checked_before_the_pixels_are_read(tmp_path):
    # Only 16 bytes of pixels: decoding first would fail as corrupt, not as too large / too small.
    big = dicom_dataset(np.zeros((4, 4), np.uint8))
    big.Rows = big.Columns = 20_000
    with pytest.raises(ImageTooLargeError, match="20000x20000"):
        read_image(_write(big, tmp_path / "big.dcm"))
    small = dicom_dataset(np.zeros((4, 4), np.uint8))
    small.Rows = small.Columns = 32
    with pytest.raises(ImageTooSmallError, match="32x32"):
        read_image(_write(small, tmp_path / "small.dcm"))


@pytest.mark.parametrize("where", ["pixels", "header"])
def test_truncated_dicom_is_corrupt(where, png, tmp_path):
    whole = _write(dicom_dataset(png), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) // 2 if where == "pixels" else 300])  # 300: past the file meta only
    with pytest.raises(CorruptImageError, match="truncated" if where == "header" else "cannot be decoded") as caught:
        read_image(cut)
    assert str(cut) in str(caught.value)
