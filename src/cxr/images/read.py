"""Reading films: one function turns a path or bytes into the grayscale array every later stage uses.

`read_image` sniffs the content (never the extension): DICOM (with or without its 128-byte preamble),
else anything Pillow recognises (PNG, JPEG, BMP, TIFF, WebP, ...). Every refusal is an `ImageError`
subclass whose message names the file, says what was wrong and what to do.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr import settings as config
from cxr.errors import CxrError


class ImageError(CxrError):
    """The input cannot be read as a film."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """The path does not exist (also a FileNotFoundError, for callers that check for that)."""


class EmptyImageError(ImageError):
    """Zero bytes."""


class NotAnImageError(ImageError):
    """Not an image at all: text, PDF, an archive, a DICOM without pixels."""


class CorruptImageError(ImageError):
    """Looks like an image but is truncated or broken."""


class ImageTooSmallError(ImageError):
    """Under the minimum side (config.MIN_SIDE): a thumbnail, not a film."""


class ImageTooLargeError(ImageError):
    """Over the pixel limit (config.MAX_PIXELS), judged from the header before decoding."""


class UnsupportedImageError(ImageError):
    """An image, but not one 2-D film we can decode: several frames, a missing codec, an odd mode."""


_FIX = "send a chest X-ray as PNG, JPEG or DICOM"
_HEAD = 1024  # enough for the DICOM magic at 128 and for telling text from binary

# Formats we recognise ourselves, to say "corrupt PNG" rather than "not an image" when Pillow gives up.
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"II*\x00": "TIFF",
                b"MM\x00*": "TIFF", b"BM": "BMP"}
_OTHER_MAGIC = {
    b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive or Office document",
    b"\x1f\x8b": "a gzip archive", b"7z\xbc\xaf": "a 7-Zip archive", b"Rar!": "a RAR archive",
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")


class _Limits(NamedTuple):
    max_pixels: int
    min_side: int


def read_image(
    src: str | os.PathLike | bytes | bytearray | memoryview, *, name: str | None = None,
    max_pixels: int | None = None, min_side: int | None = None, info: dict | None = None,
) -> np.ndarray:
    """A 2-D float32 array in [0, 1] (0 = black), whatever the file's format and bit depth.

    `name` labels the input in error messages (default: the path, or 'upload' for bytes).
    `max_pixels` and `min_side` override config.MAX_PIXELS and config.MIN_SIDE.
    `info`, if given, receives facts that the gray array loses: "colourfulness" of the original
    colours (images Pillow decodes; the not-a-chest-X-ray gate uses it without decoding twice).
    """
    limits = _Limits(config.MAX_PIXELS if max_pixels is None else max_pixels,
                     config.MIN_SIDE if min_side is None else min_side)
    label, fp = _open(src, name)
    with fp:
        head = fp.read(_HEAD)
        fp.seek(0)
        if not head:
            raise EmptyImageError(f"{label}: the file is empty (0 bytes); {_FIX}")
        if head[128:132] == b"DICM":
            from cxr.images.dicom import read_dicom

            return read_dicom(fp, label, limits, force=False)
        im = _pillow_open(fp, label, limits)
        if im is None:
            if _looks_like_bare_dicom(head):
                from cxr.images.dicom import read_dicom

                fp.seek(0)
                return read_dicom(fp, label, limits, force=True)
            raise _unrecognised(head, label)
        with im:
            return _pillow_pixels(im, label, limits, info)


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Square size x size, antialiased. Squashes rather than crops: NIH's 1024 px films were squashed too."""
    im = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32)


def _open(src, name: str | None) -> tuple[str, BinaryIO]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return name or "upload", io.BytesIO(src)
    label = name or os.fspath(src)
    try:
        return label, open(src, "rb")  # noqa: SIM115 - closed by read_image's with-block
    except FileNotFoundError:
        raise ImageNotFoundError(f"{label}: no such file; check the path") from None
    except IsADirectoryError:
        raise NotAnImageError(f"{label}: is a folder, not an image file; {_FIX}") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot be opened ({e.strerror or e}); check the file's permissions") from None


def _check_size(width: int, height: int, label: str, limits: _Limits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{label}: image is too large: {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,}; downscale it (NIH films are 1024x1024)"
        )
    if min(width, height) < limits.min_side:
        raise ImageTooSmallError(
            f"{label}: image is too small: {width}x{height} pixels, under {limits.min_side} px a side; "
            "send the full-size film, not a thumbnail"
        )


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0002 (file meta) or 0008 (identity) tag."""
    return len(head) >= 8 and struct.unpack_from("<H", head)[0] in (0x0002, 0x0008)


def _unrecognised(head: bytes, label: str) -> ImageError:
    """The error for bytes Pillow cannot identify: a broken image, a HEIC photo, or not an image."""
    for magic, fmt in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return CorruptImageError(f"{label}: looks like a {fmt} but its header is corrupt; re-export or re-send it")
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return UnsupportedImageError(f"{label}: HEIC/HEIF photos cannot be read; set the phone camera to "
                                     "'Most Compatible' (JPEG) or convert the photo to JPEG")
    what = next((w for magic, w in _OTHER_MAGIC.items() if head.startswith(magic)), None)
    if what is None:
        what = "a text file" if _is_text(head) else "unrecognised data"
    return NotAnImageError(f"{label}: not an image (looks like {what}); {_FIX}")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and b"\x00" not in head  # a character cut off by the read
    return b"\x00" not in head


def _pillow_open(fp: BinaryIO, label: str, limits: _Limits) -> Image.Image | None:
    """Identify and read the header only; None when Pillow does not recognise the format."""
    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; both are bombs to us. catch_warnings is
        # process-wide in Python < 3.14: a race can only leave this one category as an error, which is harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except UnidentifiedImageError:
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(
            f"{label}: image is too large ({e}); cxr reads up to {limits.max_pixels:,} pixels: downscale it"
        ) from None
    except Exception as e:  # noqa: BLE001 - a plugin that identified the format then choked on its header
        raise CorruptImageError(f"{label}: image header is corrupt ({e}); re-export or re-send it") from None


def _pillow_pixels(im: Image.Image, label: str, limits: _Limits, info: dict | None = None) -> np.ndarray:
    _check_size(*im.size, label, limits)  # from the header: nothing decoded or allocated yet
    fmt = im.format or "image"
    try:
        frames = getattr(im, "n_frames", 1)
    except Exception as e:  # noqa: BLE001 - counting frames walks the file and can hit its damage
        raise CorruptImageError(f"{label}: the {fmt} is corrupt ({e}); re-export or re-send it") from None
    # MPO is how many phones save JPEGs: the first frame is the photo, the rest previews or depth maps.
    if frames > 1 and fmt != "MPO":
        raise UnsupportedImageError(
            f"{label}: the {fmt} has {frames} frames; cxr reads one 2-D film: save the one frame as PNG or JPEG"
        )
    # A half-decoded film padded with grey would be read as a real one: never let Pillow accept it.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()  # Image.open is lazy: only load() decodes, so truncation surfaces here
        ImageOps.exif_transpose(im, in_place=True)  # phone photos; a no-op without an Orientation tag
    except Exception as e:  # noqa: BLE001 - every decoder error means the same to the user
        raise CorruptImageError(f"{label}: the {fmt} is truncated or corrupt ({e}); re-export or re-send it") from None
    if info is not None:
        info["colourfulness"] = colourfulness_of(im)
    return _pillow_gray(im, label)


def colourfulness_of(im: Image.Image) -> float:
    """Hasler & Suesstrunk's colourfulness of a decoded image, on a strided ~256 px sample (0 for gray
    modes; gray films stored as RGB(A), like some NIH films, score 0 too)."""
    if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return 0.0
    arr = np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))
    step = max(1, max(arr.shape[:2]) // 256)  # a strided sample: a thumbnail would cost as much as the decode
    rgb = arr[::step, ::step, :3].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _pillow_gray(im: Image.Image, label: str) -> np.ndarray:
    mode = im.mode
    if mode == "L":  # the common case (NIH films): one uint8 view, one float32 result
        return np.divide(np.asarray(im), np.float32(255), dtype=np.float32)
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _deep_gray(np.asarray(im), label)
    try:
        gray = im.convert("L")  # colour -> ITU-R 601 luma; alpha and palettes dropped by Pillow
    except ValueError:
        raise UnsupportedImageError(f"{label}: colour mode {mode} cannot be read; save it as PNG or JPEG") from None
    return np.divide(np.asarray(gray), np.float32(255), dtype=np.float32)


def _deep_gray(arr: np.ndarray, label: str) -> np.ndarray:
    """16-bit, 32-bit integer and float grayscale: a known full scale where there is one, else min-max."""
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # 16-bit PNG/TIFF: 65535 is white, however dark
        return np.divide(arr, np.float32(65535), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise CorruptImageError(f"{label}: the image holds NaN or infinite values; re-export it")
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return np.array(arr, dtype=np.float32)  # a copy: Pillow's buffer is read-only
    if arr.dtype.kind in "iu" and lo >= 0 and hi <= 65535:  # mode I: how older Pillow held 16-bit PNGs
        return np.divide(arr, np.float32(65535), dtype=np.float32)
    return _min_max(arr)


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    out = np.subtract(arr, lo, dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)
