"""Heatmaps as arrays: targets by finding name, normalise, upsample, colour and overlay, in numpy and Pillow.

This is the part of explaining that the torch-free runtime needs (`cxr predict --heatmaps`, `cxr serve`):
the maps themselves come from the model's ONNX graph (cxr.inference.camgraph) or from torch
(cxr.explain.gradcam, which re-exports these). Nothing here imports torch or matplotlib.

`JET` is matplotlib's "jet" colormap as a 256-entry table, built from the same segment data, so overlays
and the page look as they did when matplotlib drew them (tests/test_runtime.py holds the two equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxr.errors import CxrError
from cxr.findings import DISPLAY_NAMES, canonical


class ExplainError(CxrError):
    """A heatmap cannot be made as asked: unknown method or finding, or a model in training mode."""


# ------------------------------------------------------------------------------------------- targets


def _softmax(meta) -> bool:
    return meta is not None and meta.activation == "softmax"


def default_targets(meta, num_outputs: int) -> list[int]:
    """Every output of a multilabel model; the positive class (1) of the 2-class pneumothorax model."""
    return [1] if _softmax(meta) else list(range(num_outputs))


def target_indices(meta, findings: str | Sequence[str] = "all") -> list[int]:
    """Output indices for finding names (any common spelling) or "all" (see default_targets)."""
    if isinstance(findings, str):
        if findings.strip().lower() == "all":
            return default_targets(meta, len(meta.outputs))
        findings = [findings]
    out = []
    for name in findings:
        try:
            name = canonical(name)
        except ValueError as e:
            raise ExplainError(str(e)) from None
        wanted = [i for i, o in enumerate(meta.outputs) if o == name]
        if not wanted or (_softmax(meta) and wanted != [1]):
            readable = meta.outputs[1:] if _softmax(meta) else meta.outputs
            raise ExplainError(f"this model has no output for {name}; it reads: {', '.join(readable)}")
        out.append(wanted[0])
    if not out:
        raise ExplainError("no finding to explain: name at least one, or 'all'")
    return out


def file_stem(finding: str) -> str:
    """A finding's display spelling, safe as a file name: 'Pleural_Thickening' -> 'Pleural-thickening'."""
    return DISPLAY_NAMES.get(finding, finding).replace(" ", "-").replace("/", "-")


# ---------------------------------------------------------------------------------------------- maps


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map (last two dims) divided by its max: float32 in [0, 1]; all-zero maps stay zero."""
    maps = np.asarray(maps, dtype=np.float32)
    if not np.isfinite(maps).all():
        raise ExplainError("the heatmap holds NaN or infinite values: the model's outputs overflow on this film")
    peak = maps.max(axis=(-2, -1), keepdims=True) if maps.size else maps
    out = np.zeros_like(maps)
    np.divide(maps, np.maximum(peak, np.finfo(np.float32).tiny), out=out, where=peak > 0)
    return out


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of torch's bilinear interpolation with align_corners=False along one axis."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps (..., h, w) to (..., H, W) float32, bilinear as torch's F.interpolate(align_corners=False) (the
    torch path's numbers, within float rounding), then renormalised to max 1 (interpolation can lower the
    peak between samples). Separable: one small matrix product per axis, no torch."""
    maps = np.asarray(maps, dtype=np.float32)
    H, W = (int(s) for s in size)
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    ylo, yhi, wy = _bilinear_weights(h, H)
    xlo, xhi, wx = _bilinear_weights(w, W)
    flat = maps.reshape(-1, h, w)
    rows = flat[:, ylo, :] * (1 - wy)[None, :, None] + flat[:, yhi, :] * wy[None, :, None]  # n x H x w
    up = rows[:, :, xlo] * (1 - wx) + rows[:, :, xhi] * wx  # n x H x W
    return normalise(np.maximum(up, 0).reshape(*lead, H, W))


# ------------------------------------------------------------------------------------------- colour

# matplotlib's jet: (x, value) breakpoints per channel, linear in between (matplotlib's _jet_data).
_JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _table(segments: dict, n: int = 256) -> np.ndarray:
    """n x 3 float in [0, 1], computed as matplotlib's LinearSegmentedColormap computes its lookup table (the
    same float operations, so the rounding to uint8 lands on the same side everywhere)."""
    def channel(points) -> np.ndarray:
        x, y = (np.asarray(v, dtype=np.float64) for v in zip(*points))
        x, xind = x * (n - 1), (n - 1) * np.linspace(0.0, 1.0, n)
        ind = np.searchsorted(x, xind)[1:-1]
        distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
        return np.clip(np.concatenate([[y[0]], distance * (y[ind] - y[ind - 1]) + y[ind - 1], [y[-1]]]), 0.0, 1.0)

    return np.stack([channel(segments[c]) for c in ("red", "green", "blue")], axis=1)


JET = np.clip(_table(_JET_SEGMENTS) * 255.0 + 0.5, 0, 255).astype(np.uint8)  # 256 x 3 uint8


def colorize(heatmap: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """H x W in [0, 1] -> H x W x 3 uint8 through the jet table (as in the paper's figures)."""
    if cmap != "jet":
        raise ExplainError(f"unknown colormap {cmap!r}: cxr draws heatmaps in 'jet'")
    heat = np.nan_to_num(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0))
    # matplotlib picks entry int(x * N), the top value clipped to the last entry: the same index here.
    return JET[np.minimum((heat * 256).astype(np.int64), 255)]


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """The film (H x W in [0, 1]) with the coloured heatmap blended over it: H x W x 3 uint8 at the film's
    size (the heatmap is upsampled to it when smaller)."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2:
        raise ExplainError(f"overlay needs a 2-D gray film, got shape {gray.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ExplainError(f"alpha must lie in [0, 1], got {alpha}")
    if heatmap.shape != gray.shape:
        heatmap = upsample(np.asarray(heatmap, dtype=np.float32), gray.shape)
    film = np.repeat(np.clip(gray, 0.0, 1.0)[..., None] * 255.0, 3, axis=-1)
    blend = (1.0 - alpha) * film + alpha * colorize(heatmap, cmap).astype(np.float32)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)
