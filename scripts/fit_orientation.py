"""Rebuild src/cxr/assets/orientation.npz: the scorer `cxr.images.capture.orientation` reads.

Every upright film gives 8 candidates (4 turns x inverted or not) of which exactly one is the truth, so
rotation and inversion are free labels. The scorer is a conditional logit: a linear score per candidate,
softmax over the 8, L2-penalised, fitted with L-BFGS. Training films are those of patients whose id is not
a multiple of HOLDOUT_EVERY; the others are held out for tests/test_capture.py. Each 512-px training film
also appears once through capture augmentations, so photos of films are read like films.

    CXR_DATA=/work/shared/data/nih .venv/bin/python scripts/fit_orientation.py   # about a minute on 2 cores
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from cxr import images
from cxr.data.capture import CaptureAugment
from cxr.images import capture

HOLDOUT_EVERY = 5   # patient ids divisible by this are held out (tests read it back from the .npz)
L2 = 1e-2
OUT = Path(__file__).resolve().parents[1] / "src" / "cxr" / "assets" / "orientation.npz"


def held_out(name: str, every: int = HOLDOUT_EVERY) -> bool:
    return int(Path(name).name[:8]) % every == 0


def candidate_features(gray: np.ndarray) -> np.ndarray:
    """8 x F: the features of each hypothesis, the true one (upright, positive) first."""
    return np.stack([capture.features(t) for *_, t in capture.candidates(capture.thumbnail(gray))])


def collect(root: Path) -> np.ndarray:
    aug = CaptureAugment(p=0.4)
    rng = np.random.default_rng(0)
    rows = []
    for folder in ("images-64", "images-512"):
        for path in sorted((root / folder).glob("*.png")):
            if held_out(path.name):
                continue
            gray = images.read_image(path)
            rows.append(candidate_features(gray))
            if folder == "images-512":
                rows.append(candidate_features(aug(gray, rng)))
    return np.stack(rows)


def fit(x: np.ndarray, l2: float = L2) -> np.ndarray:
    """x: N x 8 x F, truth at index 0. Returns the F weights."""
    n, _, f = x.shape

    def loss(w):
        z = x @ w
        lse = logsumexp(z, axis=1)
        p = np.exp(z - lse[:, None])
        p[:, 0] -= 1.0
        grad = np.einsum("nk,nkf->f", p, x) / n + 2 * l2 * w
        return float(np.mean(lse - z[:, 0]) + l2 * w @ w), grad

    return minimize(loss, np.zeros(f), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x


def main() -> int:
    root = Path(os.environ.get("CXR_DATA", "../shared/data/nih"))
    t0 = time.time()
    x = collect(root)
    mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
    scale = x.reshape(-1, x.shape[-1]).std(axis=0) + 1e-6
    w = fit((x - mean) / scale)
    z = ((x - mean) / scale) @ w
    print(f"{len(x)} training films, accuracy on them {np.mean(z.argmax(axis=1) == 0):.4f}, {time.time() - t0:.0f} s")
    np.savez(OUT, weights=w.astype(np.float32), mean=mean.astype(np.float32), scale=scale.astype(np.float32),
             holdout_every=np.int64(HOLDOUT_EVERY), thumb=np.int64(capture.THUMB))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
