"""cxr.evaluation.report writes every figure, table, report.json and a self-contained report.html from arrays."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr.evaluation import metrics
from cxr.evaluation import report
from cxr.findings import FINDINGS

PNG = b"\x89PNG\r\n\x1a\n"


def _scores(n=160, seed=0, absent="Hernia"):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(FINDINGS))) < 0.15).astype(np.int8)
    y[:, FINDINGS.index(absent)] = 0  # a finding the evaluated films lack must not break anything
    p = np.clip(rng.random(y.shape) * 0.7 + 0.3 * y, 0, 1)
    return y, p


def test_multilabel_report_writes_everything(tmp_path):
    y, p = _scores()
    p_b = np.clip(p + np.random.default_rng(1).normal(0, 0.1, p.shape), 0, 1)
    s = metrics.summarize(y, p, FINDINGS, n_boot=40)
    s["model"] = {"name": "synthetic", "arch": "none"}
    s["compare"] = {"labels": ["weighted", "unweighted"], "summary": metrics.summarize(y, p_b, FINDINGS, n_boot=0)}
    made = report.write_report(tmp_path, y, p, s, compare=p_b, labels=("weighted", "unweighted"))

    pngs = {"fig9_roc_average", "fig10_roc", "fig11_pr_micro", "fig12_pr", "fig21_compare"}
    assert pngs <= set(made)
    for name in pngs:
        assert made[name].read_bytes()[:8] == PNG

    data = json.loads((tmp_path / "report.json").read_text())
    for key in ("per_finding", "macro_auc", "micro_auc", "macro_ap", "micro_ap", "f1", "n_images", "model"):
        assert key in data
    assert data["n_images"] == len(y)
    keys = {"auc", "auc_ci", "ap", "ap_ci", "f1", "precision", "recall", "accuracy", "threshold", "n_positive"}
    assert all(keys <= set(e) for e in data["per_finding"].values())
    assert data["per_finding"]["Hernia"]["auc"] is None
    assert set(data["f1"]) == {"unweighted", "paper_weighted"}

    with open(tmp_path / "table1_auc.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["finding"] for r in rows[:14]] == [report._label(n) for n in FINDINGS]
    assert float(rows[0]["auc"]) == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]))
    assert rows[0]["paper"] == "0.76" and rows[-1]["finding"] == "micro-average"
    md = (tmp_path / "table2_ap.md").read_text()
    assert "| Effusion |" in md and "95% CI" in md and "0.42" in md

    page = (tmp_path / "report.html").read_text()
    assert "Not for clinical use" in page
    assert page.count('src="data:image/png;base64,') == len(pngs)
    # Self-contained: no fetched resources of any kind.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(" not in page and "<script" not in page.lower()


def test_binary_report_draws_fig7(tmp_path):
    rng = np.random.default_rng(2)
    y = (rng.random(120) < 0.1).astype(int)
    p = np.clip(rng.random(120) * 0.8 + 0.25 * y, 0, 1)
    s = metrics.summarize(y, p, ["Pneumothorax"], n_boot=30)
    made = report.write_report(tmp_path, y, p, s)
    assert made["fig7_pr_roc"].read_bytes()[:8] == PNG
    assert "fig10_roc" not in made
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "binary" in page


def test_pr_curve_axes_for_explain_panels():
    y, p = _scores(absent="Hernia")
    ax = Figure().add_subplot()
    j = FINDINGS.index("Pleural_Thickening")
    ap = report.pr_curve_axes(ax, y, p, "pleural thickening")  # 2-D arrays: the finding's column
    assert ap == pytest.approx(average_precision_score(y[:, j], p[:, j]))
    assert report.pr_curve_axes(Figure().add_subplot(), y[:, j], p[:, j], "Pleural_Thickening") == ap
    assert "AP = " in ax.get_legend().get_texts()[0].get_text()
    assert report.pr_curve_axes(Figure().add_subplot(), y, p, "Hernia") is None  # no positives: noted
