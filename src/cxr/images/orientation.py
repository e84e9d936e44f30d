"""Orientation and polarity of a film: turned by 90, 180 or 270 degrees, or inverted (a negative).

A linear scorer over 8 candidates (4 turns x 2 polarities) of a 32 px thumbnail; its few parameters are
src/cxr/assets/orientation.npz (no pickle), rebuilt by scripts/fit_orientation.py on training patients only.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import numpy as np
from PIL import Image

from cxr.images.arrays import pixels, quantiles, to_gray
from cxr.images.geometry import mapped


THUMB = 32  # orientation features are read from a THUMB x THUMB thumbnail


class Orientation(NamedTuple):
    """How a film was turned: the upright film went through np.rot90(film, k_rot90), then 1 - film if inverted."""

    k_rot90: int
    inverted: bool
    confidence: float  # probability of this answer among the 8 (0.125 = no idea, 1 = certain)


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """THUMB x THUMB, squashed, robustly stretched so exposure and a photo's fog do not matter."""
    t = pixels(mapped(to_gray(gray)).resize((THUMB, THUMB), Image.Resampling.BOX))
    lo, hi = quantiles(t, 0.01, 0.99)  # np.percentile's, without its overhead
    return np.clip((t - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def correct(gray: np.ndarray, k_rot90: int, inverted: bool) -> np.ndarray:
    """Undo `Orientation` (k_rot90, inverted): the upright, positive film."""
    out = np.rot90(gray, -int(k_rot90))
    return np.ascontiguousarray(1.0 - out if inverted else out, dtype=np.float32)


def candidates(thumb: np.ndarray) -> list[tuple[int, bool, np.ndarray]]:
    """The 8 hypotheses (k_rot90, inverted) and the upright thumbnail each would mean."""
    return [(k, inv, correct(thumb, k, inv)) for inv in (False, True) for k in range(4)]


def features(upright: np.ndarray) -> np.ndarray:
    """What the scorer reads from a hypothesised upright thumbnail: the pixels at 16 x 16, their squares
    (bright bones against dark lungs is not symmetric under inversion) and a 16-bin histogram."""
    t = upright.reshape(THUMB // 2, 2, THUMB // 2, 2).mean(axis=(1, 3)).ravel()
    hist = np.bincount(np.minimum((upright * 16).astype(np.int64), 15).ravel(), minlength=16) / upright.size
    return np.concatenate([t, t * t, hist]).astype(np.float32)


@functools.cache
def scorer_parameters() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with resources.files("cxr.assets").joinpath("orientation.npz").open("rb") as f, np.load(f) as z:
        return z["weights"].astype(np.float64), z["mean"].astype(np.float64), z["scale"].astype(np.float64)


def _features_of_all(thumb: np.ndarray) -> np.ndarray:
    """8 x features: `features` of each of `candidates(thumb)`, in that order and to the bit, at once (eight
    calls' numpy overheads cost more than the arithmetic). A turn moves pixels but keeps the histogram."""
    ups = np.stack([np.rot90(thumb, -k) for k in range(4)])
    ups = np.concatenate([ups, 1.0 - ups]).astype(np.float32, copy=False)  # inverted before any cast, as `correct`
    # 2 x 2 means summed in the order numpy's mean over (1, 3) of one 16 x 2 x 16 x 2 view sums them
    t = ((ups[:, 0::2, 0::2] + ups[:, 0::2, 1::2]) + (ups[:, 1::2, 0::2] + ups[:, 1::2, 1::2])) / np.float32(4)
    t = t.reshape(8, -1)
    hist = np.stack([np.bincount(np.minimum((u * 16).astype(np.int64), 15).ravel(), minlength=16) / u.size
                     for u in (ups[0], ups[4])])
    return np.concatenate([t, t * t, np.repeat(hist, 4, axis=0)], axis=1).astype(np.float32)


def orientation(gray: np.ndarray, scorer: tuple | None = None) -> Orientation:
    """How `gray` is turned and whether it is a negative; `confidence` says how sure (see Orientation)."""
    w, mean, scale = scorer if scorer is not None else scorer_parameters()
    x = (_features_of_all(thumbnail(gray)) - mean) / scale
    z = x @ w
    p = np.exp(z - z.max())
    p /= p.sum()
    best = int(np.argmax(p))
    return Orientation(best % 4, best >= 4, float(p[best]))  # candidates' order: 4 turns, then inverted


def describe(o: Orientation) -> str:
    """What was wrong with the film, for the user ('' when it was upright and positive)."""
    turn = {1: "turned 90 degrees anticlockwise", 2: "upside down", 3: "turned 90 degrees clockwise"}
    parts = ([f"was {turn[o.k_rot90 % 4]}"] if o.k_rot90 % 4 else []) + (["was a negative"] if o.inverted else [])
    return ("this film " + " and ".join(parts)) if parts else ""
