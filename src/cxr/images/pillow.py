"""PNG, JPEG and everything else Pillow reads: header checks before decoding, one 2-D film, gray in [0, 1],
and the colourfulness of the original colours (the gate's first check) measured during the same decode."""

from __future__ import annotations

import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr.images.errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError
from cxr.images.sniff import Limits, check_size

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def open_header(fp: BinaryIO, label: str, lim: Limits) -> Image.Image | None:
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
            f"{label}: image is too large ({e}); cxr reads up to {lim.max_pixels:,} pixels: downscale it"
        ) from None
    except Exception as e:  # noqa: BLE001 - a plugin that identified the format then choked on its header
        raise CorruptImageError(f"{label}: image header is corrupt ({e}); re-export or re-send it") from None


def pixels(im: Image.Image, label: str, lim: Limits, info: dict | None = None) -> np.ndarray:
    """Decode an opened image to gray float32 in [0, 1]; info["colourfulness"] gets the original's colour."""
    check_size(*im.size, label, lim)  # from the header: nothing decoded or allocated yet
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
    return _gray(im, label)


def colourfulness_of(im: Image.Image) -> float:
    """Hasler & Suesstrunk's colourfulness of a decoded image, on a strided ~256 px sample (0 for gray
    modes; gray films stored as RGB(A), like some NIH films, score 0 too)."""
    if im.mode in GRAY_MODES:
        return 0.0
    arr = np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))
    step = max(1, max(arr.shape[:2]) // 256)  # a strided sample: a thumbnail would cost as much as the decode
    rgb = arr[::step, ::step, :3].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def min_max(arr: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] where the data has no known full scale (also used for DICOM)."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    out = np.subtract(arr, lo, dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _gray(im: Image.Image, label: str) -> np.ndarray:
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
    return min_max(arr)
