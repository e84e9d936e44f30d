"""Input conventions of imported models: a gray film made into exactly the input its source project fed it.

A model imported from another project (cxr.nets.imports) was trained on that project's preprocessing, and
it is only as good as cxr's copy of it; ModelMeta.convention says which one, and these functions redo it:

- "torchxrayvision": pixels scaled to [-1024, 1024], centre crop to a square, then skimage's resize
  (Gaussian anti-aliasing and bilinear zoom, zero padding in the scaled units) as `XRayResizer` calls it.
  One channel: the film is repeated into 3 and the importer divides conv0's weights by 3 (same convolution).
- "torchvision": the 8-bit film resized by PIL (bilinear) so its shorter side is `meta.resize`, then a centre
  crop (or, with meta.tta "tencrop", torchvision's TenCrop: 4 corners, centre, and the same mirrored), /255,
  ImageNet mean/std. CheXNet and reproduce-chexnet read films as 8-bit RGB, so 8 bits is their convention.

Ten crops come out as a 10 x 3 x S x S stack per film; `with_tta` wraps a backend so the network sees them as
a batch and the film's probability is the mean of its crops' probabilities (as CheXNet averages them),
handed on as the logit of that mean so calibration and thresholds apply downstream unchanged.
Numpy, PIL and scipy only (no torch): this runs in the decoding threads.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr import images


def custom(meta) -> bool:
    """True when `meta` needs a convention of this module rather than cxr's own squash-and-normalise."""
    return getattr(meta, "convention", "cxr") != "cxr" or getattr(meta, "tta", "none") != "none"


def prepare(gray: np.ndarray, meta) -> np.ndarray:
    """Gray float32 H x W in [0, 1] -> 3 x S x S float32, or 10 x 3 x S x S for ten-crop TTA."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D gray film (H x W), got shape {gray.shape}")
    if meta.convention == "torchxrayvision":
        crops = [xrv_resize(centre_square(gray * np.float32(2) - np.float32(1)) * np.float32(1024),
                            int(meta.input_size))]
    elif meta.convention == "torchvision":
        crops = torchvision_crops(gray, int(meta.resize or meta.input_size), int(meta.input_size), meta.tta)
    else:
        crops = [images.resize(gray, int(meta.input_size))]
    mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)
    out = np.subtract(np.stack(crops)[:, None], mean, dtype=np.float32)
    out /= std
    return out if meta.tta == "tencrop" else out[0]


def single(gray: np.ndarray, meta) -> np.ndarray:
    """One 3 x S x S input (for Grad-CAM): with ten crops, the centre one (TenCrop's fifth)."""
    x = prepare(gray, meta)
    return x[4] if x.ndim == 4 else x


def centre_square(a: np.ndarray) -> np.ndarray:
    """torchxrayvision's XRayCenterCrop: the centred square on the shorter side."""
    h, w = a.shape
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    return a[top:top + side, left:left + side]


def xrv_resize(a: np.ndarray, size: int) -> np.ndarray:
    """skimage.transform.resize(a, (size, size), mode="constant", preserve_range=True) as float32, by the same
    scipy calls skimage 0.26 makes (anti-aliasing sigma (factor - 1) / 2 when shrinking, order-1 zoom on the
    pixel grid, "constant" padding meaning scipy's grid-constant, output clipped to the input's range), so
    scikit-image is not needed at run time (tests/test_imports.py holds the two equal on real films)."""
    from scipy import ndimage as ndi

    a = np.asarray(a, dtype=np.float32)
    factors = np.divide(a.shape, (size, size))
    lo, hi = float(np.min(a)), float(np.max(a))  # of the input, before smoothing, as skimage clips
    if any(size < n for n in a.shape):
        a = ndi.gaussian_filter(a, np.maximum(0, (factors - 1) / 2), cval=0, mode="grid-constant")
    out = ndi.zoom(a, [1 / f for f in factors], order=1, mode="grid-constant", cval=0, grid_mode=True)
    if not lo <= 0 <= hi and float(out.min()) <= 0 <= float(out.max()):
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # skimage widens the range to the padding value when it shows
    return np.clip(out, lo, hi).astype(np.float32, copy=False)


def torchvision_crops(gray: np.ndarray, short: int, crop: int, tta: str = "none") -> list[np.ndarray]:
    """transforms.Resize(short) + CenterCrop(crop) (or TenCrop(crop)) + ToTensor on the 8-bit film, in [0, 1]."""
    im = Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8), mode="L")
    w, h = im.size
    lo, hi = (w, h) if w <= h else (h, w)
    new_lo, new_hi = short, int(short * hi / lo)
    size = (new_lo, new_hi) if w <= h else (new_hi, new_lo)
    a = np.asarray(im.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / np.float32(255)
    H, W = a.shape
    if crop > H or crop > W:
        raise ValueError(f"crop {crop} larger than the resized film {W}x{H}")
    top, left = int(round((H - crop) / 2.0)), int(round((W - crop) / 2.0))
    if tta != "tencrop":
        return [a[top:top + crop, left:left + crop]]
    crops = []
    for img in (a, a[:, ::-1]):  # TenCrop: five crops, then the same five of the mirrored film
        corners = [(0, 0), (0, W - crop), (H - crop, 0), (H - crop, W - crop), (top, left)]
        crops += [img[y:y + crop, x:x + crop] for y, x in corners]
    return crops


class TenCropRun:
    """A backend that takes N x K x 3 x S x S crops: runs them as one batch of N * K, then per film the mean
    of the crops' sigmoid probabilities (returned as its logit, float32) and the mean of their features."""

    def __init__(self, run):
        self.run = run

    def __getattr__(self, name: str):
        return getattr(self.run, name)

    def __call__(self, x: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim != 5:
            return self.run(x, **kw)
        n, k = x.shape[:2]
        logits, feats = self.run(np.ascontiguousarray(x.reshape(n * k, *x.shape[2:])), **kw)
        p = (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).reshape(n, k, -1).mean(axis=1)
        p = np.clip(p, 1e-15, 1 - 1e-15)
        return np.log(p / (1 - p)).astype(np.float32), feats.reshape(n, k, -1).mean(axis=1).astype(np.float32)


def with_tta(run, meta):
    """`run` (a backend) wrapped for meta's test-time augmentation, or `run` itself when there is none."""
    return TenCropRun(run) if getattr(meta, "tta", "none") == "tencrop" else run
