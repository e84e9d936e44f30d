"""Images: read a film from PNG, JPEG or DICOM into one grayscale array, with typed, actionable errors."""

from cxr.images.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    UnsupportedImageError,
)
from cxr.images.pillow import colourfulness_of
from cxr.images.read import Film, read_film, read_image, resize
from cxr.images.sniff import Limits

__all__ = [
    "CorruptImageError", "EmptyImageError", "Film", "ImageError", "ImageNotFoundError", "ImageTooLargeError",
    "ImageTooSmallError", "Limits", "NotAnImageError", "UnsupportedImageError", "colourfulness_of", "read_film",
    "read_image", "resize",
]
