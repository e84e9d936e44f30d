"""Reading films: one function turns a path or bytes into the grayscale array every later stage uses.

(Minimal first version: PNG/JPEG through Pillow. Issue 2 §3 extends it: DICOM, typed errors, limits.)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.errors import CxrError


class ImageError(CxrError):
    """The input cannot be read as a film."""


def read_image(src: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
    """A 2-D float32 array in [0, 1] (0 = black), whatever the file's format and bit depth."""
    label = name or (str(src) if not isinstance(src, bytes) else "upload")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else Path(src)) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001 - refined in issue 2 §3
        raise ImageError(f"{label}: cannot read image ({e})") from None
    return arr


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Square size x size, antialiased. Squashes rather than crops: NIH's 1024 px films were squashed too."""
    im = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32)
