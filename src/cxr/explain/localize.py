"""Heatmaps against radiologists' boxes (NIH BBox_List_2017.csv): the pointing game and IoU.

Definitions (stated in localization.json too):

- Boxes are in the coordinates of the 1024 x 1024 NIH film; they are scaled to each film's actual size
  (a 512 px copy halves them). A box covers film pixels [round(x*s), round((x+w)*s)) on each axis, at
  least one, so a box neither grows on a small film nor vanishes.
- Pointing game (Zhang et al. 2016): a hit when a pixel where the heatmap reaches its maximum lies inside
  one of the finding's boxes grown by MARGIN_AT_1024 = 15 px on every side (at 1024 px; scaled with the
  box). An all-zero heatmap points nowhere: a miss.
- IoU: the region where the heatmap is >= IOU_LEVEL = 0.5 of its maximum, against the union of the
  finding's boxes (not grown), in film pixels. 0 for an all-zero heatmap.
- Centre baseline: whether the film's centre pixel would have been a hit. Boxes sit near the middle of a
  chest film, so a hit rate is only informative above this one.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.findings import DISPLAY_NAMES, FINDINGS

NIH_SIDE = 1024  # boxes are in pixels of the 1024 x 1024 released films
MARGIN_AT_1024 = 15.0
IOU_LEVEL = 0.5

Box = tuple[float, float, float, float]  # x, y, w, h in 1024-px coordinates


def _span(start: float, length: float, scale: float, limit: int) -> tuple[int, int]:
    lo = min(max(0, round(start * scale)), limit - 1)
    hi = min(limit, round((start + length) * scale))
    return lo, max(hi, lo + 1)  # at least one pixel


def box_mask(shape: tuple[int, int], boxes: Iterable[Box], margin: float = 0.0) -> np.ndarray:
    """Boolean H x W mask of the union of boxes (1024-px coordinates) scaled to a film of `shape`, each
    grown by `margin` pixels (at 1024 px) on every side."""
    h, w = int(shape[0]), int(shape[1])
    sy, sx = h / NIH_SIDE, w / NIH_SIDE
    mask = np.zeros((h, w), dtype=bool)
    for x, y, bw, bh in boxes:
        r0, r1 = _span(y - margin, bh + 2 * margin, sy, h)
        c0, c1 = _span(x - margin, bw + 2 * margin, sx, w)
        mask[r0:r1, c0:c1] = True
    return mask


def pointing_hit(heatmap: np.ndarray, boxes: Iterable[Box], margin: float = MARGIN_AT_1024) -> bool:
    """Whether the heatmap's maximum falls inside a box grown by margin (see the module's definitions)."""
    heatmap = np.asarray(heatmap)
    peak = float(heatmap.max())
    if not peak > 0:
        return False
    return bool((box_mask(heatmap.shape, boxes, margin) & (heatmap >= peak)).any())


def box_iou(heatmap: np.ndarray, boxes: Iterable[Box], level: float = IOU_LEVEL) -> float:
    """IoU of {heatmap >= level * max} with the union of the boxes, in the film's pixels."""
    heatmap = np.asarray(heatmap)
    peak = float(heatmap.max())
    if not peak > 0:
        return 0.0
    region = heatmap >= level * peak
    truth = box_mask(heatmap.shape, boxes)
    union = np.count_nonzero(region | truth)
    return float(np.count_nonzero(region & truth) / union) if union else 0.0


def boxes_by_image(boxes: pd.DataFrame) -> dict[str, dict[str, list[Box]]]:
    """{image name: {finding: [boxes]}} from nih.read_boxes' frame."""
    out: dict[str, dict[str, list[Box]]] = defaultdict(lambda: defaultdict(list))
    for row in boxes.itertuples(index=False):
        out[row.image][row.finding].append((float(row.x), float(row.y), float(row.w), float(row.h)))
    return {k: dict(v) for k, v in out.items()}


def score(image: str, finding: str, heatmap: np.ndarray, boxes: list[Box]) -> dict:
    """One (film, finding) record: hit, IoU, centre baseline, and where the peak is (1024-px coordinates)."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    h, w = heatmap.shape
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    grown = box_mask(heatmap.shape, boxes, MARGIN_AT_1024)
    return {
        "image": image, "finding": finding, "boxes": [list(b) for b in boxes], "film_size": [int(h), int(w)],
        "hit": pointing_hit(heatmap, boxes), "iou": box_iou(heatmap, boxes),
        "peak_xy_1024": [round((col + 0.5) * NIH_SIDE / w, 1), round((row + 0.5) * NIH_SIDE / h, 1)],
        "centre_hit": bool(grown[h // 2, w // 2]),
    }


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per finding (FINDINGS order) and over all: n, hits, hit rate, mean IoU, centre-baseline hit rate."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["finding"]].append(r)
    order = [f for f in FINDINGS if f in groups] + sorted(set(groups) - set(FINDINGS))
    rows = {f: groups[f] for f in order}
    if records:
        rows["all"] = records
    return {name: _aggregate(rs) for name, rs in rows.items()}


def _aggregate(rs: list[dict]) -> dict:
    n = len(rs)
    hits = sum(r["hit"] for r in rs)
    return {"n": n, "hits": hits, "hit_rate": hits / n, "mean_iou": float(np.mean([r["iou"] for r in rs])),
            "centre_hit_rate": sum(r["centre_hit"] for r in rs) / n}


def definitions(method: str) -> dict:
    return {
        "method": method,
        "pointing_game": f"hit when a maximum of the heatmap lies inside the box grown by {MARGIN_AT_1024:g} px "
                         f"per side at {NIH_SIDE} px (scaled to the film); all-zero heatmaps miss",
        "iou": f"heatmap >= {IOU_LEVEL:g} x its max vs the union of the finding's boxes, in film pixels",
        "centre_hit_rate": "hit rate of always pointing at the film's centre (baseline)",
        "margin_px_at_1024": MARGIN_AT_1024, "iou_level": IOU_LEVEL,
    }


def write_json(path: str | os.PathLike, records: list[dict], method: str) -> Path:
    path = Path(path)
    body = {"definitions": definitions(method), "summary": summarise(records), "films": records}
    path.write_text(json.dumps(body, indent=1))
    return path


def table(summary: dict[str, dict], method: str):
    """A rich Table of summarise()'s rows."""
    from rich.table import Table

    t = Table(title=f"Localisation vs radiologists' boxes ({method}; pointing game +-{MARGIN_AT_1024:g} px "
                    f"at 1024, IoU at {IOU_LEVEL:g} x max)")
    for col in ("finding", "boxed films", "hits", "hit rate", "centre baseline", "mean IoU"):
        t.add_column(col, justify="left" if col == "finding" else "right")
    for name, s in summary.items():
        if name == "all":
            t.add_section()
        t.add_row(DISPLAY_NAMES.get(name, name), str(s["n"]), str(s["hits"]), f"{s['hit_rate']:.2f}",
                  f"{s['centre_hit_rate']:.2f}", f"{s['mean_iou']:.3f}")
    return t
