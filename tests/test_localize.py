"""cxr.explain.localize: box scaling, the pointing game and IoU, and `cxr explain --boxes` on the sample's boxed films."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cxr.explain import localize as L
from cxr.data.nih import read_boxes

BOXED = ("00001369_000.png", "00001933_000.png", "00002578_000.png", "00004296_000.png", "00008386_000.png",
         "00009745_000.png")  # the sample's films from the test list that have radiologists' boxes


def test_box_mask_scales_each_axis():
    mask = L.box_mask((512, 512), [(100, 200, 50, 60)])
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (100, 130, 50, 75)
    tall = L.box_mask((1024, 256), [(100, 200, 50, 60)])  # 4x narrower, same height
    rows, cols = np.nonzero(tall)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (200, 260, 25, 38)
    tiny = L.box_mask((64, 64), [(1000, 1000, 1, 1)])  # 62.5 to 62.6: never vanishes
    assert tiny.sum() == 1 and tiny[62, 62]
    edge = L.box_mask((64, 64), [(1022, 1022, 2, 2)])  # 63.9 to 64: never leaves the film
    assert edge.sum() == 1 and edge[63, 63]


def test_pointing_game_with_margin():
    box = [(400, 400, 100, 100)]
    heat = np.zeros((1024, 1024), np.float32)
    heat[450, 450] = 1.0
    assert L.pointing_hit(heat, box)
    heat[:] = 0
    heat[450, 510] = 1.0  # 10 px right of the box: inside the 15 px margin
    assert L.pointing_hit(heat, box) and not L.pointing_hit(heat, box, margin=0)
    heat[:] = 0
    heat[450, 520] = 1.0  # 20 px right: outside
    assert not L.pointing_hit(heat, box)
    heat[450, 450] = 1.0  # a tie with a maximum inside counts
    assert L.pointing_hit(heat, box)
    assert not L.pointing_hit(np.zeros((64, 64)), box)  # an empty map points nowhere
    half = np.zeros((512, 512), np.float32)
    half[225, 225] = 1.0  # the box centre on a 512 px film
    assert L.pointing_hit(half, box)


def test_iou_of_the_thresholded_map():
    box = [(0, 0, 512, 1024)]  # the left half of the film
    heat = np.zeros((256, 256), np.float32)
    heat[:, :128] = 0.9
    heat[0, 0] = 1.0
    assert L.box_iou(heat, box) == pytest.approx(1.0)
    heat[:, :] = 0.2
    heat[:, 64:192] = 1.0  # half inside, half outside: 1/3
    assert L.box_iou(heat, box) == pytest.approx(1 / 3)
    assert L.box_iou(heat, box, level=0.1) == pytest.approx(0.5)  # the whole film is the region
    assert L.box_iou(np.zeros((8, 8)), box) == 0.0


def test_score_and_summary():
    heat = np.zeros((512, 512), np.float32)
    heat[100, 50] = 1.0
    rec = L.score("f.png", "Nodule", heat, [(80, 180, 40, 40)])
    assert rec["hit"] and rec["peak_xy_1024"] == [101.0, 201.0] and rec["film_size"] == [512, 512]
    assert not rec["centre_hit"]
    miss = {**rec, "image": "g.png", "hit": False, "iou": 0.5, "centre_hit": True}
    other = {**rec, "finding": "Atelectasis", "iou": 0.2}
    summary = L.summarise([rec, miss, other])
    assert list(summary) == ["Atelectasis", "Nodule", "all"]  # FINDINGS order, then the total
    assert summary["Nodule"]["n"] == 2 and summary["Nodule"]["hit_rate"] == 0.5
    assert summary["Nodule"]["mean_iou"] == pytest.approx((rec["iou"] + 0.5) / 2)
    assert summary["all"]["hits"] == 2 and summary["all"]["centre_hit_rate"] == pytest.approx(1 / 3)
    assert L.summarise([]) == {}


def _blob(shape, box, scale):
    """A Gaussian heatmap centred on a (1024-px) box, drawn on a film of `shape`."""
    x, y, w, h = (v * scale for v in box)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-(((xx + 0.5 - x - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y - h / 2) / (h / 2)) ** 2)).astype(np.float32)


def test_boxes_at_512_and_1024_agree(nih_dir, images_512, images_1024):
    boxes = L.boxes_by_image(read_boxes(nih_dir / "BBox_List_2017.csv"))
    for name in BOXED:
        (finding, [box]), = boxes[name].items()
        small = Image.open(images_512 / name).size[::-1]
        full = Image.open(images_1024 / name).size[::-1]
        heat_small, heat_full = _blob(small, box, small[0] / 1024), _blob(full, box, full[0] / 1024)
        assert L.pointing_hit(heat_small, [box]) and L.pointing_hit(heat_full, [box])
        assert L.box_iou(heat_small, [box]) == pytest.approx(L.box_iou(heat_full, [box]), abs=0.02)
        assert L.box_iou(heat_full, [box]) > 0.3


def test_cli_localisation_on_boxed_films(nih_dir, images_512, tmp_path):
    from typer.testing import CliRunner

    from cxr.cli import app

    films = [str(images_512 / n) for n in BOXED[:3]]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", *films, "--model", "random:efficientnet_lite0", "--no-panels",
                                      "--finding", "Cardiomegaly", "--finding", "Pneumonia", "--finding", "Mass",
                                      "--boxes", str(nih_dir / "BBox_List_2017.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    body = json.loads((out / "localization.json").read_text())
    pairs = sorted((r["image"], r["finding"]) for r in body["films"])
    # 00002578_000 has only a Nodule box, which was not explained; no film has a Mass box
    assert pairs == [("00001369_000.png", "Cardiomegaly"), ("00001933_000.png", "Pneumonia")]
    assert all(r["film_size"] == [512, 512] and 0 <= r["iou"] <= 1 for r in body["films"])
    assert body["summary"]["all"]["n"] == 2 and body["definitions"]["margin_px_at_1024"] == 15
    assert "hit rate" in result.output and not (out / "00001369_000" / "Cardiomegaly-panel.png").exists()
