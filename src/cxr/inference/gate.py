"""The not-a-chest-X-ray gate: refuse a photo, a screenshot, a CT slice or noise instead of reading 14 numbers.

Two stages, both run by `cxr.inference.predictor.Predictor` on every input:

1. Image checks on the decoded film, before the network (`image_check`): strongly coloured images (films
   are grayscale; `colourfulness` reads the ORIGINAL colours, before `images.read_image` makes them gray),
   blank or near-uniform images, shapes no film has (one side over twice the other) and images that are
   mostly one flat shade (documents, slides, drawings).
2. A distance in the network's own feature space (`Stats`): the mean-pooled `model.features(x)` of a film
   (`cxr.inference.backends.pooled`, which every backend returns beside the logits),
   L2-normalised, compared with the training films by a probabilistic-PCA Mahalanobis distance (the top
   `dims` principal directions whitened, the rest as one isotropic residual). `cxr gate-fit` fits it and
   sets the threshold at `margin` x the `percentile`-th percentile of the distances of calibration films
   that the fit did not see. The statistics live in the checkpoint as extra tensors, the threshold and the
   method in `meta.gate`.

Choices behind the method, each measured (figures in docs/BENCHMARKS.md, "The gate"): L2-normalising
the pooled features widens the margin between films and non-films (a photo's features differ from a
film's mostly in direction); the residual term carries most of the discrimination (non-films lie off the
films' principal subspace), which is why a Mahalanobis distance inside a PCA subspace alone failed;
Ledoit-Wolf on all dimensions did as well as PPCA but stores a megabytes-large precision matrix; a fit on
512 px films alone rejected many 64 px films, so the fit and the calibration also see every film
downscaled to `config.MIN_SIDE`, the smallest film cxr reads. The image checks' thresholds below sit
between what NIH films and non-films score.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cxr import settings as config
from cxr.errors import CxrError, ModelError

REFUSAL = "not a frontal chest X-ray"
METHOD = "ppca-l2"
MAX_COLOURFULNESS = 20.0  # Hasler-Suesstrunk; "slightly colourful" starts at 15, a tinted phone photo of a film ~5
MIN_STD = 0.02            # gray levels in [0, 1]
MAX_ASPECT = 2.0          # long side / short side; a 14 x 17 inch film is 1.2
MAX_FLAT_SHARE = 0.75     # share of pixels at the single most common of 256 shades
_SAMPLE_SIDE = 256        # image checks look at a strided sample about this size: statistics, not detail


class GateError(CxrError):
    """The gate cannot be fitted as asked (too few films, unreadable data)."""


def refusal(detail: str) -> str:
    return f"{REFUSAL}: {detail}"


# ---------------------------------------------------------------------------------------- image checks


def colourfulness(src) -> float:
    """Hasler & Suesstrunk's colourfulness of the original image (path or bytes), on a ~256 px sample.

    0 for grayscale files and for anything Pillow cannot open (DICOM, broken files: `images.read_image`
    reports those). Gray images stored as RGB, like some NIH films, also score 0. The Predictor gets this
    from `images.read_image(..., info=...)` instead, without a second decode; this is for other callers.
    """
    from PIL import Image

    from cxr.images import colourfulness_of

    try:
        im = Image.open(io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src)
        with im:
            if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                return 0.0  # decided from the header alone: nothing decoded
            im.draft("RGB", (256, 256))  # JPEG: decode at reduced scale
            return colourfulness_of(im)
    except Exception:  # noqa: BLE001 - unreadable here means "no colour to measure", not an error
        return 0.0


def image_check(gray: np.ndarray, colour: float = 0.0) -> str | None:
    """The refusal reason for a decoded film (gray HxW in [0, 1]) and its colourfulness, or None if it passes."""
    h, w = gray.shape
    if colour > MAX_COLOURFULNESS:
        return refusal(f"a colour image (colourfulness {colour:.0f}, over {MAX_COLOURFULNESS:.0f}); "
                       "films are grayscale")
    if max(h, w) > MAX_ASPECT * min(h, w):
        return refusal(f"{w}x{h} pixels is not the shape of a chest film (one side over {MAX_ASPECT:g}x the other)")
    step = max(1, max(h, w) // _SAMPLE_SIDE)
    sample = gray[::step, ::step]
    std = float(sample.std())
    if std < MIN_STD:
        return refusal(f"the image is blank or nearly uniform (contrast {std:.3f})")
    shades = np.bincount(np.clip(sample * 255 + 0.5, 0, 255).astype(np.uint8).ravel(), minlength=256)
    share = float(shades.max()) / sample.size
    if share > MAX_FLAT_SHARE:
        return refusal(f"{share:.0%} of the image is one flat shade (a document, screenshot or drawing?)")
    return None


# ------------------------------------------------------------------------------------ feature distance


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Stats:
    """Probabilistic PCA of the L2-normalised pooled features of real films."""

    mean: np.ndarray        # D
    components: np.ndarray  # D x k, orthonormal columns
    variances: np.ndarray   # k, variance along each component
    residual: float         # variance per dimension off the principal subspace

    PREFIX = "gate."

    @classmethod
    def fit(cls, features: np.ndarray, dims: int = 64) -> Stats:
        x = _unit(features)
        n, d = x.shape
        k = min(dims, n // 4, d - 1)
        if k < 2:
            raise GateError(f"the gate needs at least 8 films to fit (got {n}); give it more real films")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2 / (n - 1)
        return cls(mean, vt[:k].T.copy(), var[:k].copy(), float(max(var[k:].mean(), 1e-12)))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance of each row of features (N x D) from the films: ~1 for a typical film, larger further out."""
        xc = _unit(features) - self.mean
        z = xc @ self.components
        resid = np.einsum("nd,nd->n", xc, xc) - np.einsum("nk,nk->n", z, z)  # ||xc||^2 off the subspace
        inside = (z**2 / self.variances).sum(axis=1)
        return np.sqrt((inside + np.maximum(resid, 0.0) / self.residual) / xc.shape[1])

    def tensors(self) -> dict[str, np.ndarray]:
        """The statistics as float32 arrays under "gate." names: the checkpoint's extra tensors (nets.save
        takes numpy)."""
        arrays = {"mean": self.mean, "components": self.components, "variances": self.variances,
                  "residual": np.array([self.residual])}
        return {self.PREFIX + k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}

    @classmethod
    def from_tensors(cls, extra: dict) -> Stats | None:
        """From a checkpoint's extra tensors: numpy (the torch-free runtime reads them so) or torch."""
        p = cls.PREFIX
        names = ("mean", "components", "variances", "residual")
        if not all(p + n in extra for n in names):
            return None
        t = {n: _numpy(extra[p + n]) for n in names}
        return cls(t["mean"], t["components"], t["variances"], float(t["residual"].reshape(-1)[0]))


def _numpy(value) -> np.ndarray:
    """float64 numpy from a numpy array or a torch tensor, without importing torch."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


class Gate:
    """The image checks plus, when the checkpoint has them, the fitted statistics and threshold."""

    def __init__(self, meta, extra: dict, num_features: int):
        self.stats = Stats.from_tensors(extra) if meta.gate else None
        self.threshold = float(meta.gate.get("threshold", 0.0)) if self.stats is not None else None
        if meta.gate and self.stats is None:
            raise ModelError("the checkpoint's metadata describes a gate but its statistics are missing; "
                             "re-run `cxr gate-fit` on it")
        if self.stats is not None:
            if meta.gate.get("method") != METHOD or not self.threshold or self.threshold <= 0:
                raise ModelError(f"unknown gate {meta.gate.get('method')!r} or threshold in the checkpoint; "
                                 f"this cxr knows {METHOD!r}: re-run `cxr gate-fit`")
            if self.stats.mean.shape != (num_features,):
                raise ModelError(f"the gate was fitted on {self.stats.mean.shape[0]} features, the model has "
                                 f"{num_features}: re-run `cxr gate-fit` on this model")

    @property
    def fitted(self) -> bool:
        return self.stats is not None

    def check_features(self, features: np.ndarray) -> list[tuple[float | None, str | None]]:
        """Per film: (gate score = distance / threshold, so > 1 is refused; refusal reason or None)."""
        if self.stats is None:
            return [(None, None)] * len(features)
        ratios = self.stats.score(features) / self.threshold
        return [(float(r), refusal(f"it does not resemble the films this model was trained on "
                                   f"(distance {r:.2f} x the limit)") if r > 1 else None) for r in ratios]


# ------------------------------------------------------------------------------------------- fitting


def _hash_unit(name: str) -> float:
    """A stable number in [0, 1) from a file name: the same split on every machine and every run."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16) / 16**12


def split(names: Sequence[str], calibration_fraction: float,
          max_films: int | None = None) -> tuple[list[int], list[int]]:
    """(fit indices, calibration indices) by hashed file name; at most max_films, the lowest hashes."""
    order = sorted(range(len(names)), key=lambda i: _hash_unit(os.path.basename(str(names[i]))))
    if max_films:
        order = order[:max_films]
    cal = [i for i in order if _hash_unit("cal:" + os.path.basename(str(names[i]))) < calibration_fraction]
    chosen = set(cal)
    return [i for i in order if i not in chosen], cal


def fit(predictor, films: Sequence[str | os.PathLike], *, dims: int = 64, percentile: float = 99.0,
        margin: float = 1.1, calibration_fraction: float = 0.35, max_films: int | None = 4000,
        low_res: int = config.MIN_SIDE, photo: Callable[[np.ndarray, int], np.ndarray] | None = None,
        progress: Callable[[int], None] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Fit the gate on real films with a `cxr.inference.predictor.Predictor` (its backend computes the features).

    Returns (meta.gate, extra tensors). Films are split by hashed file name into fit and calibration
    sets; every film is also used downscaled to `low_res` px (see the module docstring) and, with `photo`,
    as a photo of it (`photo(gray, index)`, read as an upload is): a film photographed on a light box,
    cropped and rectified, still differs from the file, and the page asks users to send such photos.
    """
    if not 0 < calibration_fraction < 1 or not 50 <= percentile <= 100 or margin < 1:
        raise GateError("need 0 < calibration_fraction < 1, 50 <= percentile <= 100 and margin >= 1")
    fit_idx, cal_idx = split(films, calibration_fraction, max_films)
    if len(cal_idx) < 10 or len(fit_idx) < 8:
        raise GateError(f"{len(films)} films give {len(fit_idx)} to fit and {len(cal_idx)} to calibrate the gate; "
                        "give at least ~50 real frontal films (hundreds are better)")
    feats, skipped = predictor.embed([films[i] for i in fit_idx + cal_idx], low_res=low_res, photo=photo,
                                     progress=progress)
    n_fit = len(fit_idx) - sum(1 for i in skipped if i < len(fit_idx))
    per_film = 1 + bool(low_res) + (photo is not None)  # rows: each film, its low-res copy, its photo
    fit_feats, cal_feats = feats[: per_film * n_fit], feats[per_film * n_fit:]
    if len(cal_feats) < 10 * per_film:
        raise GateError(f"only {len(cal_feats) // per_film} readable calibration films ({len(skipped)} skipped as "
                        "unreadable or not film-like); give more real frontal films")
    stats = Stats.fit(fit_feats, dims)
    cal_scores = stats.score(cal_feats)
    threshold = float(margin * np.percentile(cal_scores, percentile))
    gate = {
        "method": METHOD, "threshold": threshold, "percentile": percentile, "margin": margin,
        "dims": int(stats.components.shape[1]), "low_res": low_res, "input_size": predictor.meta.input_size,
        "fit_films": n_fit, "calibration_films": len(cal_feats) // per_film, "skipped_films": len(skipped),
        "features": "mean-pooled model.features, L2-normalised", "photos": photo is not None,
        "calibration_accepted": float((cal_scores <= threshold).mean()),
    }
    return gate, stats.tensors()
