"""Small array helpers shared by the film finder and the orientation scorer (numpy and Pillow, no torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_gray(image: np.ndarray) -> np.ndarray:
    """H x W x 3 (or 4) colour -> H x W luma with Pillow's weights, so it sees what `read_image` gives."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        return a
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def to_pil(gray: np.ndarray) -> Image.Image:
    """A Pillow 'F' image sharing the array's memory (fromarray copies: milliseconds on a 1024-px film)."""
    a = np.ascontiguousarray(gray, dtype=np.float32)
    return Image.frombuffer("F", (a.shape[1], a.shape[0]), a, "raw", "F", 0, 1)


def pixels(im: Image.Image) -> np.ndarray:
    """A Pillow 'F' image's pixels as a new float32 array, pasted by Pillow straight into the array's memory:
    np.asarray goes through tobytes and copies twice (a tenth of a millisecond for a 160 px film)."""
    out = np.empty((im.height, im.width), dtype=np.float32)
    try:
        Image.core.map_buffer(out, im.size, "raw", 0, ("F", 0, 1)).paste(im.im, (0, 0, *im.size))
    except Exception:  # noqa: BLE001 - only slower
        return np.asarray(im, dtype=np.float32)
    return out


def quantiles(a: np.ndarray, *qs: float) -> list[float]:
    """np.percentile(a, 100 * q) (linear) for each q from one np.partition: on the finder's and the orientation
    scorer's small arrays percentile's own overhead cost five times the selection."""
    flat, last = a.ravel(), a.size - 1
    part = np.partition(flat, sorted({min(int(q * last) + k, last) for q in qs for k in (0, 1)}))
    lo = [int(q * last) for q in qs]
    return [float(part[i] + (q * last - i) * (part[min(i + 1, last)] - part[i])) for q, i in zip(qs, lo)]
