"""The one family of image errors: every refusal to read a film is an `ImageError` subclass whose
message names the file, says what was wrong and what to do."""

from __future__ import annotations

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
    """Under the minimum side (settings.MIN_SIDE): a thumbnail, not a film."""


class ImageTooLargeError(ImageError):
    """Over the pixel limit (settings.MAX_PIXELS), judged from the header before decoding."""


class UnsupportedImageError(ImageError):
    """An image, but not one 2-D film we can decode: several frames, a missing codec, an odd mode."""


FIX = "send a chest X-ray as PNG, JPEG or DICOM"
