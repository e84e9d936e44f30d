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
from collections.abc import Sequence
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr import config
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
            return _read_dicom(fp, label, limits, force=False)
        im = _pillow_open(fp, label, limits)
        if im is None:
            if _looks_like_bare_dicom(head):
                fp.seek(0)
                return _read_dicom(fp, label, limits, force=True)
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


def _read_dicom(fp: BinaryIO, label: str, limits: _Limits, *, force: bool) -> np.ndarray:
    import pydicom  # about a second to import: only films that need it pay for it

    try:
        # Large values (the pixels) stay on disk until asked for, so the header is checked first.
        ds = pydicom.dcmread(fp, force=force, defer_size="256 KB")
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a bad header
        if force:  # it only looked like DICOM
            raise NotAnImageError(f"{label}: not an image (unrecognised data); {_FIX}") from None
        raise CorruptImageError(f"{label}: DICOM header cannot be read ({e}); re-export the study") from None
    _check_dicom_header(ds, label, limits)
    _check_decoder(ds, label)
    try:
        gray = _dicom_gray(ds.pixel_array, ds, label)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - short pixel data, bad LUTs, decoder failures
        raise CorruptImageError(f"{label}: DICOM pixel data cannot be decoded ({e}); re-export the study") from None
    if gray.ndim != 2:
        raise UnsupportedImageError(f"{label}: DICOM pixel data has shape {gray.shape}, not one 2-D film")
    return gray


def _check_dicom_header(ds, label: str, limits: _Limits) -> None:
    """Pixels present, one frame, a size within limits: all from the header, before any pixel is read."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom stops quietly where a file is cut or garbled: an image class without pixels means damage.
        sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        if "Rows" in ds or (sop is not None and "Image Storage" in sop.name):
            raise CorruptImageError(
                f"{label}: this DICOM image has no Pixel Data: the file is truncated or damaged; re-export the study"
            )
        raise NotAnImageError(
            f"{label}: this DICOM holds no image (no Pixel Data: a report or presentation state?); "
            "send the image file of the study"
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise CorruptImageError(f"{label}: DICOM header is incomplete ({e}); re-export the study") from None
    if frames > 1:
        raise UnsupportedImageError(
            f"{label}: the DICOM has {frames} frames (a cine loop or volume); cxr reads one 2-D film: "
            "export a single frame"
        )
    _check_size(cols, rows, label, limits)


def _check_decoder(ds, label: str) -> None:
    """Refuse a compressed transfer syntax we cannot decode, saying what to install."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    meta = ds.file_meta  # dcmread always gives one; a bare dataset's is empty
    if "TransferSyntaxUID" not in meta:  # pydicom saw how the bare dataset was encoded
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                  uid.ExplicitVRLittleEndian if little is not False else uid.ExplicitVRBigEndian)
    tsyntax = meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedImageError(
            f"{label}: DICOM transfer syntax {tsyntax.name} cannot be decoded; export the study uncompressed"
        ) from None
    if decoder.is_available:
        return
    hint = ("pip install pylibjpeg pylibjpeg-openjpeg" if "JPEG 2000" in tsyntax.name else
            "pip install pylibjpeg pylibjpeg-libjpeg" if "JPEG" in tsyntax.name else
            "install one of: " + "; ".join(decoder.missing_dependencies))
    raise UnsupportedImageError(
        f"{label}: DICOM pixel data is compressed as {tsyntax.name} and no decoder for it is installed; {hint}"
    )


def _dicom_gray(arr: np.ndarray, ds, label: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _monochrome(arr, ds)
        if photometric == "MONOCHROME1":  # stored with white = low: invert after the VOI, as viewers do
            np.subtract(np.float32(1), gray, out=gray)
        return gray
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _luma(rgb, np.iinfo(rgb.dtype).max)
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB, and YBR_* that pydicom has converted to RGB
        return _luma(arr, 2 ** int(ds.get("BitsStored", 8)) - 1)
    raise UnsupportedImageError(f"{label}: DICOM photometric interpretation {photometric} is not supported")


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    gray = (0.299 * r + 0.587 * g + 0.114 * b) / np.float32(full_scale)
    return np.clip(gray, 0.0, 1.0, out=gray)


def _monochrome(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT (rescale), then the VOI (LUT or window); min-max where the file gives no VOI."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds)
    gray = _voi(values, ds)
    if gray is not None:
        return gray
    bits = int(ds.get("BitsStored", 8))
    slope, intercept = float(ds.get("RescaleSlope") or 1), float(ds.get("RescaleIntercept") or 0)
    identity = "ModalityLUTSequence" not in ds and slope == 1 and intercept == 0
    if bits <= 8 and arr.dtype.kind == "u" and identity:
        # 8-bit pixels are display values already, like a PNG's; stretching them would change the film.
        return np.divide(arr, np.float32(2**bits - 1), dtype=np.float32)
    return _min_max(values)  # deeper films rarely fill their bit range: stretch what is there


def _voi(values: np.ndarray, ds) -> np.ndarray | None:
    """The first VOI LUT, else the first window, mapped straight to [0, 1]; None when there is neither.

    Done here, not by pydicom's apply_voi_lut: its output range must be rebuilt from BitsStored and the
    rescale to normalise it, and pydicom 3.0 indexes 8-bit LUTs with uint8 (wrong past 256 entries).
    """
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        return _voi_lut(values, seq[0], little_endian=ds.original_encoding[1] is not False)
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    x = np.asarray(values, dtype=np.float32)
    if func == "SIGMOID" and width > 0:
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if func == "LINEAR_EXACT" and width > 0:
        gray = (x - np.float32(center)) / np.float32(width) + np.float32(0.5)
    elif width > 1:  # LINEAR (PS3.3 C.11.2.1.2.1), also for unknown functions, as viewers do
        gray = (x - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)
    elif width == 1:
        gray = (x > center - 0.5).astype(np.float32)  # a one-value window is a threshold
    else:
        return None  # a nonsensical width: better the whole range than nothing
    return np.clip(gray, 0.0, 1.0, out=gray)


def _voi_lut(values: np.ndarray, item, *, little_endian: bool) -> np.ndarray:
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # VR OW: raw 16-bit words
        lut = np.frombuffer(data, dtype="<u2" if little_endian else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(data))
    lut = lut[: entries or 65536].astype(np.float32)
    # Some writers declare fewer bits than their entries use: never let white exceed 1.
    full_scale = max(float(2**bits - 1), float(lut.max()), 1.0)
    lut /= np.float32(full_scale)
    index = np.rint(values) if values.dtype.kind == "f" else values.astype(np.int64)
    index = np.clip(index - first, 0, len(lut) - 1).astype(np.intp)
    return lut[index]


def _first_number(value) -> float | None:
    """A DS value (one number or several, one per alternative view): the first, or None if unusable."""
    if isinstance(value, Sequence) and not isinstance(value, str):  # pydicom's MultiValue
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):  # None, '' or junk
        return None
