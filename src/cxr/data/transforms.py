"""Preprocessing: the one path from a gray film to a model input, for training, evaluation and inference.

Small composable callables in the manner of MONAI: each step is a picklable object (DataLoader workers
receive copies), `Compose` chains them. Random steps split `draw()` (the random parameters) from
`apply(x, params)` (deterministic), so a preview can show what was drawn and a test can check the maths.

The paper (Elkins et al. 2020, "Data augmentation") trained with fastai v1's `get_transforms`: rotation
within +-30 degrees, zoom up to 1.3 with probability 0.5, brightness and contrast with max_lighting 0.4 and
probability 1. We reproduce fastai v1's semantics rather than torchvision's look-alikes:

- rotation and zoom are one affine warp with *reflection* padding (fastai's default). v2.RandomAffine
  can only fill the corners with a constant, and black wedges are a cue real films never show.
- brightness and contrast act in logit space, as fastai's lighting transforms do: brightness adds
  logit(change), change ~ U(0.3, 0.7); contrast multiplies by a log-uniform factor in (0.6, 1/0.6).
  v2.ColorJitter scales linearly and clips, which saturates a film's bright bones and dark lungs.

Normalisation differs from the paper on purpose: fastai normalised with statistics of a batch, we use the
fixed per-model mean/std recorded in the checkpoint, because inference on one film has no batch to take
statistics from, and a film's prediction must not depend on which films share its batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cxr import images
_EPS = 1e-7  # fastai's clamp before logit: keeps pure black/white pixels finite


class Compose:
    """Apply steps in order. `trace` also returns the random parameters each random step drew."""

    def __init__(self, *steps: Callable):
        self.steps = tuple(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def trace(self, x) -> tuple[object, dict]:
        params: dict = {}
        for step in self.steps:
            if hasattr(step, "draw"):
                p = step.draw()
                params.update(p)
                x = step.apply(x, p)
            else:
                x = step(x)
        return x, params

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.steps)) + ")"


class Resize:
    """Gray float32 HxW -> float32 size x size through `images.resize` (squashed, antialiased)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        gray = np.asarray(gray)
        if gray.ndim != 2:
            raise ValueError(f"expected a 2-D gray film (H x W), got shape {gray.shape}")
        return images.resize(gray, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class ToTensor:
    """Float32 HxW array -> torch 1xHxW. Copies: resized arrays are read-only views of Pillow buffers
    (and torch.tensor(array) is ten times slower than from_numpy of a copy)."""

    def __call__(self, gray: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(gray, dtype=np.float32, copy=True)).unsqueeze(0)

    def __repr__(self) -> str:
        return "ToTensor()"


class Gray3:
    """1xHxW -> 3xHxW (a view): DenseNet's ImageNet weights expect three channels."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(3, -1, -1)

    def __repr__(self) -> str:
        return "Gray3()"


class _Random:
    """Shared by random steps: where the random numbers come from.

    generator=None (the default, and what training uses) draws from torch's global RNG, which the
    DataLoader seeds differently in each worker from torch.manual_seed, so seeded training is
    reproducible. A private generator suits single-process use (previews, tests); it is refused inside
    a DataLoader worker, where every worker would hold an identical copy and repeat the same draws.
    """

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def _uniform(self, n: int) -> list[float]:
        if self.generator is not None and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "a transform with its own torch.Generator is running in a DataLoader worker, where each "
                "worker would repeat the same augmentations: build it with generator=None and seed "
                "training with torch.manual_seed instead"
            )
        return torch.rand(n, generator=self.generator, dtype=torch.float64).tolist()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.draw())


class RandAffine(_Random):
    """fastai v1 `rotate` then `rand_zoom` as one warp of a 1xSxS tensor, reflection padding.

    A positive angle turns the film counter-clockwise as displayed (rows downwards).

    Every call draws the same count of numbers whatever the probabilities, so one seed gives one stream.
    """

    def __init__(self, max_rotate=30.0, p_rotate=1.0, max_zoom=1.3, p_zoom=0.5, generator=None):
        super().__init__(generator)
        self.max_rotate, self.p_rotate = float(max_rotate), float(p_rotate)
        self.max_zoom, self.p_zoom = float(max_zoom), float(p_zoom)

    def draw(self) -> dict:
        u = self._uniform(6)
        angle = (2 * u[1] - 1) * self.max_rotate if u[0] < self.p_rotate else 0.0
        zoomed = u[2] < self.p_zoom
        return {
            "angle": angle,
            "scale": 1 + u[3] * (self.max_zoom - 1) if zoomed else 1.0,
            "row": u[4] if zoomed else 0.5,  # zoom's focal point: fraction of the height
            "col": u[5] if zoomed else 0.5,
        }

    @staticmethod
    def apply(x: torch.Tensor, p: dict) -> torch.Tensor:
        if p["angle"] == 0 and p["scale"] == 1:
            return x
        a = math.radians(p["angle"])
        rotate = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0, 0, 1]])
        # fastai's _zoom: output coordinates shrink by 1/scale about a focal point that keeps the window inside
        inv = 1 / p["scale"]
        shift_x, shift_y = (1 - inv) * (2 * p["col"] - 1), (1 - inv) * (2 * p["row"] - 1)
        zoom = torch.tensor([[inv, 0.0, shift_x], [0.0, inv, shift_y], [0, 0, 1]])
        theta = (rotate @ zoom)[:2].unsqueeze(0)  # output -> input coordinates, fastai's order
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        out = F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return out.squeeze(0)

    def __repr__(self) -> str:
        return (f"RandAffine(rotate=+-{self.max_rotate:g} p={self.p_rotate:g}, "
                f"zoom<={self.max_zoom:g} p={self.p_zoom:g})")


class RandLighting(_Random):
    """fastai v1 `brightness` then `contrast` on a [0, 1] tensor, both in logit space."""

    def __init__(self, max_lighting=0.4, p=1.0, generator=None):
        super().__init__(generator)
        if not 0 <= max_lighting < 1:
            raise ValueError(f"max_lighting must be in [0, 1), got {max_lighting}")
        self.max_lighting, self.p = float(max_lighting), float(p)

    def draw(self) -> dict:
        u = self._uniform(4)
        m = self.max_lighting
        # brightness: change ~ U(0.5(1-m), 0.5(1+m)); contrast: log-uniform in (1-m, 1/(1-m))
        change = 0.5 * (1 - m) + u[1] * m if u[0] < self.p else 0.5
        contrast = (1 - m) ** (1 - 2 * u[3]) if u[2] < self.p else 1.0
        return {"brightness": change, "contrast": contrast}

    @staticmethod
    def apply(x: torch.Tensor, p: dict) -> torch.Tensor:
        if p["brightness"] == 0.5 and p["contrast"] == 1:
            return x
        logit = torch.logit(x.clamp(_EPS, 1 - _EPS))
        return torch.sigmoid((logit + math.log(p["brightness"] / (1 - p["brightness"]))) * p["contrast"])

    def __repr__(self) -> str:
        return f"RandLighting(max_lighting={self.max_lighting:g}, p={self.p:g})"


class RandCapture(_Random):
    """Phone-capture noise (cxr.data.capture.CaptureAugment: JPEG, perspective, tilt, glare, tint, exposure,
    blur, light-box border and crop), each step with probability `p`, on the gray film before resizing.

    CaptureAugment draws from numpy; its generator is seeded from one draw of the torch stream, so the
    training seed (per epoch and film, cxr.training.train.SeededFilms) fixes it as it fixes every other step.
    """

    def __init__(self, p: float = 0.3, generator: torch.Generator | None = None):
        super().__init__(generator)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"capture augmentation probability must be in [0, 1], got {p}")
        from cxr.data.capture import CaptureAugment

        self.p = float(p)
        self._augment = CaptureAugment(self.p)

    def draw(self) -> dict:
        return {"capture_seed": int(self._uniform(1)[0] * 2**53)}

    def apply(self, gray: np.ndarray, p: dict) -> np.ndarray:
        return self._augment(np.asarray(gray, dtype=np.float32), np.random.default_rng(p["capture_seed"]))

    def __repr__(self) -> str:
        return f"RandCapture(p={self.p:g})"


def _normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Normalize:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need three values each and std > 0, got mean={mean} std={std}")
    return v2.Normalize(mean, std)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """Gray float32 HxW -> float32 3 x size x size, normalised: evaluation and inference."""
    return Compose(Resize(size), ToTensor(), Gray3(), _normalize(mean, std))


def train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    max_rotate: float = 30.0,
    max_zoom: float = 1.3,
    p_zoom: float = 0.5,
    max_lighting: float = 0.4,
    p_lighting: float = 1.0,
    capture: float = 0.0,
) -> Compose:
    """The paper's training augmentations (defaults), then the same 3-channel normalisation as eval.

    Resizing comes first, antialiased, exactly as in evaluation: warping a 1024 px film straight to 224 px
    (as fastai did) would alias, and then training and evaluation inputs would differ in sharpness.
    capture > 0: phone-capture noise (`RandCapture`, each step with that probability) before resizing,
    at the film's own resolution, where a phone's JPEG and blur happen.
    """
    first = (RandCapture(capture, generator=generator),) if capture > 0 else ()
    return Compose(
        *first,
        Resize(size),
        ToTensor(),
        RandAffine(max_rotate, 1.0, max_zoom, p_zoom, generator=generator),
        RandLighting(max_lighting, p_lighting, generator=generator),
        Gray3(),
        _normalize(mean, std),
    )


@functools.lru_cache(maxsize=16)
def _cached_eval(size: int, mean: tuple, std: tuple) -> Compose:
    return eval_transform(size, mean, std)


def preprocess(gray: np.ndarray, meta) -> torch.Tensor:
    """The evaluation transform for a model: reads `meta.input_size`, `meta.mean`, `meta.std`."""
    size = int(meta.input_size)
    return _cached_eval(size, tuple(map(float, meta.mean)), tuple(map(float, meta.std)))(gray)
