"""read_image through Pillow (PNG, JPEG and friends) and every refusal; resize. DICOM is in test_dicom.py."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cxr.errors import CxrError
from cxr.images import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnsupportedImageError,
    read_image,
    resize,
)

FILM = "00000493_000.png"  # values 6..232: shows that 8-bit films are not stretched
RGBA_FILM = "00000100_000.png"  # one of the RGBA films in the original release


@pytest.fixture(scope="module")
def film_path(images_512: Path) -> Path:
    return images_512 / FILM


@pytest.fixture(scope="module")
def film(film_path: Path) -> np.ndarray:
    with Image.open(film_path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 255


# ------------------------------------------------------------------------------------------ good input


def test_grayscale_png_is_float32_2d_and_exact(film_path, film):
    gray = read_image(film_path)
    assert gray.dtype == np.float32 and gray.shape == film.shape
    np.testing.assert_array_equal(gray, film.astype(np.float32) / 255)
    assert gray.min() == 6 / np.float32(255) and gray.max() <= 1


def test_bytes_and_path_give_the_same_array(film_path, film):
    data = film_path.read_bytes()
    by_path = read_image(film_path)
    for src in (data, bytearray(data), memoryview(data), str(film_path)):
        np.testing.assert_array_equal(read_image(src), by_path)


def test_sixteen_bit_png_scales_by_65535_not_clipped(film, tmp_path):
    rng = np.random.default_rng(0)
    deep = (film.astype(np.uint16) * 257) ^ rng.integers(0, 256, film.shape, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    gray = read_image(path)
    np.testing.assert_allclose(gray, deep / 65535, atol=1e-6)
    assert np.abs(gray - film / 255).max() < 1 / 255  # the 8-bit film underneath survives


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "I", "F", "1"])
def test_every_mode_becomes_luminance(mode, film):
    rng = np.random.default_rng(1)
    rgb = np.dstack([film, 255 - film, film // 2])
    if mode == "RGB":
        im, expected = Image.fromarray(rgb), _luma(rgb)
    elif mode == "RGBA":  # random alpha must not matter: it is dropped, not composited
        rgba = np.dstack([rgb, rng.integers(0, 256, film.shape, dtype=np.uint8)])
        im, expected = Image.fromarray(rgba), _luma(rgb)
    elif mode == "P":
        im = Image.fromarray(rgb).quantize(64)
        expected = _luma(np.asarray(im.convert("RGB")).astype(np.float64))
    elif mode == "LA":
        im, expected = Image.fromarray(np.dstack([film, film[::-1]]), "LA"), film / 255
    elif mode == "I":  # 32-bit integer holding 16-bit values, as older Pillow gave 16-bit PNGs
        im, expected = Image.fromarray(film.astype(np.int32) * 257), film / 255
    elif mode == "F":
        im, expected = Image.fromarray(film.astype(np.float32) / 255), film / 255
    else:
        im, expected = Image.fromarray(film).convert("1", dither=Image.Dither.NONE), (film >= 128).astype(float)
    assert im.mode == mode
    fmt = "TIFF" if mode in ("I", "F") else "PNG"
    gray = read_image(_save(im, fmt))
    assert gray.dtype == np.float32 and gray.ndim == 2 and gray.flags.writeable  # callers may work in place
    np.testing.assert_allclose(gray, expected, atol=1 / 255 + 1e-6)


def test_float_and_wide_integer_images_are_stretched_when_out_of_range():
    ramp = np.linspace(-1000, 3000, 100 * 80, dtype=np.float32).reshape(100, 80)
    gray = read_image(_save(Image.fromarray(ramp), "TIFF"))
    np.testing.assert_allclose(gray, (ramp + 1000) / 4000, atol=1e-6)
    nan = ramp.copy()
    nan[5, 5] = np.nan
    with pytest.raises(CorruptImageError, match="NaN"):
        read_image(_save(Image.fromarray(nan), "TIFF"), name="nan.tif")


def test_real_rgba_film_reads_as_its_gray_channels(images_1024):
    with Image.open(images_1024 / RGBA_FILM) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    gray = read_image(images_1024 / RGBA_FILM)
    assert gray.shape == (1024, 1024)
    np.testing.assert_allclose(gray, rgba[..., 0] / 255, atol=1e-6)  # R = G = B in these films


@pytest.mark.parametrize("fmt, opts, tol", [("BMP", {}, 0), ("TIFF", {}, 0), ("WEBP", {"lossless": True}, 0),
                                            ("JPEG", {"quality": 95}, 0.06), ("GIF", {}, 0)])
def test_other_formats_are_sniffed_whatever_the_extension(fmt, opts, tol, film, tmp_path):
    path = tmp_path / "film.png"  # the extension lies on purpose
    path.write_bytes(_save(Image.fromarray(film), fmt, **opts))
    gray = read_image(path)
    assert np.abs(gray - film / 255).max() <= tol + 1e-6
    assert np.abs(gray - film / 255).mean() < 0.01


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])
def test_jpeg_exif_orientation_is_applied(orientation, turn, film):
    photo = film[:, :300]  # not square, so a missed rotation changes the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    gray = read_image(_save(Image.fromarray(photo), "JPEG", quality=95, exif=exif))
    expected = np.rot90(photo, turn) / 255
    assert gray.shape == expected.shape
    assert np.abs(gray - expected).mean() < 0.01


def test_phone_mpo_reads_its_first_frame(film):
    first, second = Image.fromarray(film), Image.fromarray(255 - film)
    data = _save(first, "MPO", save_all=True, append_images=[second], quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "MPO" and im.n_frames == 2
    assert np.abs(read_image(data) - film / 255).mean() < 0.01


def test_limits_can_be_overridden(film_path):
    assert read_image(film_path, min_side=512).shape == (512, 512)
    with pytest.raises(ImageTooSmallError):
        read_image(film_path, min_side=513)
    with pytest.raises(ImageTooLargeError):
        read_image(film_path, max_pixels=512 * 512 - 1)
    assert read_image(_save(Image.new("L", (20, 20)), "PNG"), min_side=16).shape == (20, 20)


# ------------------------------------------------------------------------------------------- refusals


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header (with valid CRCs) claims width x height but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _multi_frame(fmt: str, film: np.ndarray) -> bytes:
    frames = [Image.fromarray(film), Image.fromarray(255 - film), Image.fromarray(film // 2)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:])


def _truncated(fmt: str):
    return lambda film: (data := _save(Image.fromarray(film), fmt))[: len(data) // 2]


BAD_INPUTS = {
    # case: (builder(film) -> bytes, error type, words the message must hold)
    "text": (lambda f: "Patient: Jane Doe\nchest film attached ✓\n".encode() * 20, NotAnImageError,
             ["not an image", "text"]),
    "random": (lambda f: b"\xff\xfe" + np.random.default_rng(2).bytes(5000), NotAnImageError, ["not an image"]),
    "pdf": (lambda f: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + b"\0" * 500, NotAnImageError,
            ["not an image", "PDF"]),
    "dicom-like garbage": (lambda f: b"\x08\x00\x05\x00" + np.random.default_rng(3).bytes(3000), NotAnImageError,
                           ["not an image"]),
    "zip": (lambda f: b"PK\x03\x04\x14\x00" + b"\0" * 500, NotAnImageError, ["not an image", "ZIP"]),
    "heic": (lambda f: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 100, UnsupportedImageError, ["HEIC", "JPEG"]),
    "empty": (lambda f: b"", EmptyImageError, ["empty"]),
    "truncated png": (_truncated("PNG"), CorruptImageError, ["truncated"]),
    "truncated jpeg": (_truncated("JPEG"), CorruptImageError, ["truncated"]),
    "broken png header": (lambda f: _png_header(512, 512)[:20] + b"\0" * 40, CorruptImageError, ["PNG", "corrupt"]),
    "tiny": (lambda f: _save(Image.fromarray(f[:32, :32]), "PNG"), ImageTooSmallError, ["too small", "32x32", "64"]),
    "bomb": (lambda f: _png_header(100_000, 100_000), ImageTooLargeError, ["too large"]),
    "over pillow warning": (lambda f: _png_header(10_000, 10_000), ImageTooLargeError, ["too large"]),
    "over our limit": (lambda f: _png_header(9_000, 9_000), ImageTooLargeError,
                       ["too large", "9000x9000", "64,000,000"]),
    "tiff pages": (lambda f: _multi_frame("TIFF", f), UnsupportedImageError, ["3 frames"]),
    "gif frames": (lambda f: _multi_frame("GIF", f), UnsupportedImageError, ["3 frames"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_a_typed_error_naming_file_and_problem(case, film, tmp_path):
    build, error, words = BAD_INPUTS[case]
    path = tmp_path / f"{case.replace(' ', '-')}.png"
    path.write_bytes(build(film))
    with pytest.raises(error) as caught:
        read_image(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert isinstance(caught.value, ImageError) and isinstance(caught.value, CxrError)
    # bytes input: the same refusal, labelled by name (or 'upload')
    with pytest.raises(error, match=r"^upload: "):
        read_image(path.read_bytes())
    with pytest.raises(error, match=r"^chest\.png: "):
        read_image(path.read_bytes(), name="chest.png")


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such file") as caught:
        read_image(tmp_path / "nowhere.png")
    assert "nowhere.png" in str(caught.value) and isinstance(caught.value, FileNotFoundError)
    with pytest.raises(NotAnImageError, match="folder"):
        read_image(tmp_path)


def test_truncation_is_refused_even_if_someone_turned_on_pillows_leniency(film, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _save(Image.fromarray(film), "PNG")
    with pytest.raises(CorruptImageError, match="truncated"):
        read_image(data[: len(data) * 2 // 3])


# -------------------------------------------------------------------------------------- resize, speed


def test_resize_squashes_to_a_float32_square():
    ramp = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (120, 1))  # 120 x 300, left dark, right light
    out = resize(ramp, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out[:, 0].max() < 0.02 and out[:, -1].min() > 0.98  # squashed: both ends kept, not cropped
    np.testing.assert_allclose(resize(np.full((100, 50), 0.25), 32), 0.25, atol=1e-6)


def test_errors_are_one_family_and_survive_a_process_boundary():
    # cache.prepare decodes in worker processes: the error must come back pickled, type and message intact.
    for cls in (EmptyImageError, NotAnImageError, CorruptImageError, ImageTooSmallError, ImageTooLargeError,
                UnsupportedImageError, ImageNotFoundError):
        assert issubclass(cls, ImageError) and issubclass(cls, CxrError)
        back = pickle.loads(pickle.dumps(cls("film.png: what went wrong; what to do")))
        assert type(back) is cls and str(back) == "film.png: what went wrong; what to do"


# -------------------------------------------------------------------------------- read_film, the package


def test_read_film_is_one_decode_with_what_the_gate_needs(film_path, film):
    from cxr import images

    got = images.read_film(film_path)
    assert got.name == str(film_path) and got.size == (film.shape[1], film.shape[0])
    assert np.array_equal(got.gray, read_image(film_path)) and got.colourfulness == 0.0
    photo = np.zeros((100, 120, 3), np.uint8)
    photo[..., 0] = 255  # pure red: far over the gate's limit of 20
    red = images.read_film(_save(Image.fromarray(photo), "PNG"))
    assert red.name == "upload" and red.size == (120, 100) and red.colourfulness > 50


def test_images_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, cxr.images as i; i.read_image; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
