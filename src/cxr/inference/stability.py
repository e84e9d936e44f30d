"""A per-film stability estimate: how far the probabilities move under a few cheap test-time variants.

A phone photo of a film could as well have been taken a few degrees turned, compressed harder or exposed
differently. The Predictor reads the film as it came and, when asked, also three fixed variants of it
(`VARIANTS`); the spread is the largest |dp| over the reported findings and the variants, and a film whose
spread exceeds `LIMIT` is "unstable": its numbers depend on how it was photographed, not only on the film.

The variants are deterministic (the same film always gets the same estimate) and made at twice the
model's input side, so they cost a few milliseconds besides one batched forward pass of three films.
numpy and Pillow only: this runs in the decode threads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxr import images

TILT_DEG = 4.0        # a phone held a little askew
JPEG_QUALITY = 70     # a messaging app's recompression
GAMMA, LIFT = 1.25, 0.05  # auto-exposure: a darker midtone and a lifted black (the film's fog)
VARIANTS = ("tilt", "jpeg", "exposure")
# A finding whose likelihood moves by more than 10 points under these small changes is not a reading to
# act on. The bundled model (frozen ImageNet body; only its heads saw capture augmentations) on the shared
# films: median spread 0.046 / 0.030 / 0.051, unstable 9.7% / 4.2% / 12% (549 images-512, 689 images-64, 24
# images-1024 films; the fine-tuned Lite1 ensemble before it: ~0.2% / 0.6%); the model before capture
# augmentations was unstable on most films.
LIMIT = 0.10


@dataclass(frozen=True)
class Stability:
    spread: float                 # max |dp| over the reported findings and the variants
    per_variant: dict[str, float]  # variant -> max |dp| over the reported findings
    limit: float = LIMIT

    @property
    def unstable(self) -> bool:
        return self.spread > self.limit

    def to_dict(self) -> dict:
        return {"spread": round(self.spread, 4), "per_variant": {k: round(v, 4) for k, v in self.per_variant.items()},
                "limit": self.limit, "unstable": self.unstable, "variants": list(self.per_variant)}


def _u8(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8))


def variants(gray: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """The test-time variants of a film (gray float32 H x W in [0, 1]), each side x side."""
    base = images.resize(gray, side)
    edge = float(np.median(np.concatenate([base[0], base[-1], base[:, 0], base[:, -1]])))
    tilt = Image.fromarray(base, mode="F").rotate(TILT_DEG, Image.Resampling.BILINEAR, fillcolor=edge)
    buf = io.BytesIO()
    _u8(base).save(buf, "JPEG", quality=JPEG_QUALITY)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
    # The power in float64, rounded once to float32: numpy's float32 power is not correctly rounded and its
    # errors depend on the CPU (its AVX-512 loop is 1 ulp off on ~17% of pixels, AVX2's on ~0.05%); this is
    # the same on every CPU, and it is what the offline page computes (Math.pow, then Math.fround).
    curve = np.power(np.clip(base, 0, 1).astype(np.float64), GAMMA).astype(np.float32)
    exposure = LIFT + (1 - LIFT) * curve  # float32 from here on, step by step as the page
    return {"tilt": np.asarray(tilt, dtype=np.float32), "jpeg": jpeg, "exposure": exposure}


def inputs(gray: np.ndarray, meta) -> np.ndarray:
    """V x 3 x S x S (or V x 10 x 3 x S x S for ten-crop models): the variants, preprocessed as films are."""
    from cxr.inference.pipeline import preprocess

    made = variants(gray, 2 * int(meta.input_size))
    return np.stack([preprocess(made[name], meta) for name in VARIANTS])


def measure(p0: np.ndarray, pv: np.ndarray, columns) -> Stability:
    """From the film's probabilities (outputs) and its variants' (V x outputs), on the reported columns."""
    d = np.abs(np.asarray(pv, np.float64)[:, columns] - np.asarray(p0, np.float64)[columns][None])
    per = {name: float(d[i].max()) for i, name in enumerate(VARIANTS)}
    return Stability(float(d.max()), per)
