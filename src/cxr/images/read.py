"""Reading films: one function turns a path or bytes into the grayscale array every later stage uses.

`read_image` sniffs the content (never the extension): DICOM (with or without its 128-byte preamble),
else anything Pillow recognises (PNG, JPEG, BMP, TIFF, WebP, ...). `read_film` does the same one decode
and keeps what the not-a-chest-X-ray gate needs besides the pixels. Every refusal is an `ImageError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxr.images import pillow, sniff
from cxr.images.errors import FIX, EmptyImageError


@dataclass(frozen=True)
class Film:
    """One decoded film: everything later stages need, so nothing decodes it twice."""

    gray: np.ndarray                 # float32 H x W in [0, 1], 0 = black
    size: tuple[int, int]            # (width, height) of the file as decoded
    colourfulness: float | None      # of the original colours; None where not measured (DICOM: gray by nature)
    name: str                        # the label used in messages


def read_image(
    src: sniff.Source, *, name: str | None = None,
    max_pixels: int | None = None, min_side: int | None = None, info: dict | None = None,
) -> np.ndarray:
    """A 2-D float32 array in [0, 1] (0 = black), whatever the file's format and bit depth.

    `name` labels the input in error messages (default: the path, or 'upload' for bytes).
    `max_pixels` and `min_side` override settings.MAX_PIXELS and settings.MIN_SIDE.
    `info`, if given, receives facts that the gray array loses: "colourfulness" of the original
    colours (images Pillow decodes; the not-a-chest-X-ray gate uses it without decoding twice).
    """
    lim = sniff.limits(max_pixels, min_side)
    label, fp = sniff.open_source(src, name)
    with fp:
        head = fp.read(sniff.HEAD)
        fp.seek(0)
        if not head:
            raise EmptyImageError(f"{label}: the file is empty (0 bytes); {FIX}")
        if sniff.is_dicom(head):
            from cxr.images.dicom import read_dicom  # pydicom loads only for films that need it

            return read_dicom(fp, label, lim, force=False)
        im = pillow.open_header(fp, label, lim)
        if im is None:
            if sniff.looks_like_bare_dicom(head):
                from cxr.images.dicom import read_dicom

                fp.seek(0)
                return read_dicom(fp, label, lim, force=True)
            raise sniff.unrecognised(head, label)
        with im:
            return pillow.pixels(im, label, lim, info)


def read_film(src: sniff.Source, *, name: str | None = None, max_pixels: int | None = None,
              min_side: int | None = None) -> Film:
    """`read_image`'s one decode, with the film's size and colourfulness kept beside the pixels."""
    info: dict = {}
    gray = read_image(src, name=name, max_pixels=max_pixels, min_side=min_side, info=info)
    label = name or ("upload" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src))
    return Film(gray, (int(gray.shape[1]), int(gray.shape[0])), info.get("colourfulness"), label)


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Square size x size, antialiased. Squashes rather than crops: NIH's 1024 px films were squashed too."""
    im = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32)
