"""Before decoding: open the input, tell what it is from its first bytes (never its extension), and hold
its header to the size limits, so nothing large is allocated for a file that will be refused."""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO, NamedTuple

from cxr import settings
from cxr.images.errors import (
    FIX,
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnsupportedImageError,
)

HEAD = 1024  # enough for the DICOM magic at 128 and for telling text from binary

# Formats we recognise ourselves, to say "corrupt PNG" rather than "not an image" when Pillow gives up.
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"II*\x00": "TIFF",
                b"MM\x00*": "TIFF", b"BM": "BMP"}
_OTHER_MAGIC = {
    b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive or Office document",
    b"\x1f\x8b": "a gzip archive", b"7z\xbc\xaf": "a 7-Zip archive", b"Rar!": "a RAR archive",
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")

Source = str | os.PathLike | bytes | bytearray | memoryview


class Limits(NamedTuple):
    max_pixels: int
    min_side: int


def limits(max_pixels: int | None = None, min_side: int | None = None) -> Limits:
    """The given limits, settings.MAX_PIXELS and settings.MIN_SIDE where not given."""
    return Limits(settings.MAX_PIXELS if max_pixels is None else max_pixels,
                  settings.MIN_SIDE if min_side is None else min_side)


def open_source(src: Source, name: str | None) -> tuple[str, BinaryIO]:
    """(label for messages, a binary file) for a path or bytes; the caller closes the file."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return name or "upload", io.BytesIO(src)
    label = name or os.fspath(src)
    try:
        return label, open(src, "rb")  # noqa: SIM115 - closed by the caller's with-block
    except FileNotFoundError:
        raise ImageNotFoundError(f"{label}: no such file; check the path") from None
    except IsADirectoryError:
        raise NotAnImageError(f"{label}: is a folder, not an image file; {FIX}") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot be opened ({e.strerror or e}); check the file's permissions") from None


def check_size(width: int, height: int, label: str, lim: Limits) -> None:
    if width * height > lim.max_pixels:
        raise ImageTooLargeError(
            f"{label}: image is too large: {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{lim.max_pixels:,}; downscale it (NIH films are 1024x1024)"
        )
    if min(width, height) < lim.min_side:
        raise ImageTooSmallError(
            f"{label}: image is too small: {width}x{height} pixels, under {lim.min_side} px a side; "
            "send the full-size film, not a thumbnail"
        )


def is_dicom(head: bytes) -> bool:
    """A DICOM file with its 128-byte preamble."""
    return head[128:132] == b"DICM"


def looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0002 (file meta) or 0008 (identity) tag."""
    return len(head) >= 8 and struct.unpack_from("<H", head)[0] in (0x0002, 0x0008)


def unrecognised(head: bytes, label: str) -> ImageError:
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
    return NotAnImageError(f"{label}: not an image (looks like {what}); {FIX}")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and b"\x00" not in head  # a character cut off by the read
    return b"\x00" not in head
