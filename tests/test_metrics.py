"""cxr.evaluation.metrics against scikit-learn on fixed arrays, and the paper's per-sample class weights (Eq. 1, 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.utils.class_weight import compute_class_weight

from cxr.evaluation import metrics as M
def _data(n=400, prevalences=(0.1, 0.3, 0.05), seed=0):
    """Labels and informative scores rounded to 2 decimals, so there are many ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(prevalences))) < prevalences).astype(np.int8)
    p = np.round(np.clip(rng.random(y.shape) * 0.6 + 0.35 * y, 0, 1), 2)
    return y, p


def test_paper_class_weights_eq6():
    # Eq. 6: W = [All others 0.5566, Pneumothorax 4.902] is 'balanced' weighting at 10.2% prevalence.
    y = np.r_[np.zeros(898, int), np.ones(102, int)]
    assert M.class_weights(y) == pytest.approx([0.5566, 4.902], abs=5e-4)
    assert M.class_weights(y) == pytest.approx(compute_class_weight("balanced", classes=np.array([0, 1]), y=y))
    assert M.class_weights(np.zeros(5, int)).tolist() == [1.0, 1.0]


def test_f1_two_class_task_matches_sklearn_with_paper_weights():
    y, p = _data(prevalences=(0.1,))
    pred = (p >= 0.5).astype(int)
    w = compute_class_weight("balanced", classes=np.array([0, 1]), y=y[:, 0])[y[:, 0]]
    got = M.f1_report(y, pred)
    for key, sw in (("unweighted", None), ("paper_weighted", w)):
        out = got[key]
        assert out["binary"] == pytest.approx(f1_score(y[:, 0], pred[:, 0], sample_weight=sw))
        for avg in ("micro", "macro", "weighted"):
            assert out[avg] == pytest.approx(f1_score(y[:, 0], pred[:, 0], average=avg, sample_weight=sw)), avg
        assert out["per_class"] == pytest.approx(f1_score(y[:, 0], pred[:, 0], average=None, sample_weight=sw))
    # Balanced weights give each class half the weight, so 'weighted' collapses onto 'macro'.
    assert got["paper_weighted"]["weighted"] == pytest.approx(got["paper_weighted"]["macro"])
    assert got["unweighted"]["weighted"] != pytest.approx(got["unweighted"]["macro"])


def test_f1_multilabel_matches_sklearn_with_mean_class_weights():
    y, p = _data()
    pred = (p >= 0.5).astype(int)
    per = [compute_class_weight("balanced", classes=np.array([0, 1]), y=y[:, f])[y[:, f]] for f in range(3)]
    sw = np.mean(per, axis=0)
    assert M.sample_weights(y) == pytest.approx(sw)
    assert M.sample_weights(y).sum() == pytest.approx(len(y))
    got = M.f1_report(y, pred)
    for key, w in (("unweighted", None), ("paper_weighted", sw)):
        for avg in ("micro", "macro", "weighted", "samples"):
            want = f1_score(y, pred, average=avg, sample_weight=w, zero_division=1.0)
            assert got[key][avg] == pytest.approx(want), (key, avg)
        assert got[key]["per_output"] == pytest.approx(f1_score(y, pred, average=None, sample_weight=w))


def test_confusion_metrics_match_sklearn():
    y, p = _data(prevalences=(0.2,))
    y1, pred = y[:, 0], (p[:, 0] >= 0.45).astype(int)
    got = M.confusion_metrics(y1, pred)
    assert got["accuracy"] == pytest.approx(accuracy_score(y1, pred))
    assert got["precision"] == pytest.approx(precision_score(y1, pred))
    assert got["recall"] == pytest.approx(recall_score(y1, pred))
    assert got["f1"] == pytest.approx(f1_score(y1, pred))
    w = M.class_weights(y1)[y1]
    assert M.confusion_metrics(y1, pred, w)["f1"] == pytest.approx(f1_score(y1, pred, sample_weight=w))
    nothing = M.confusion_metrics(np.zeros(4, int), np.zeros(4, int))
    assert nothing["precision"] is None and nothing["recall"] is None and nothing["f1"] == 1.0


def test_summary_auc_ap_match_sklearn():
    y, p = _data()
    s = M.summarize(y, p, ["A", "B", "C"], n_boot=50)
    for f, name in enumerate("ABC"):
        e = s["per_finding"][name]
        assert e["auc"] == pytest.approx(roc_auc_score(y[:, f], p[:, f]))
        assert e["ap"] == pytest.approx(average_precision_score(y[:, f], p[:, f]))
        assert e["n_positive"] == int(y[:, f].sum())
        w = M.class_weights(y[:, f])[y[:, f]]
        assert e["ap_weighted"] == pytest.approx(average_precision_score(y[:, f], p[:, f], sample_weight=w))
    assert s["micro_auc"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert s["macro_auc"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert s["micro_ap"] == pytest.approx(average_precision_score(y, p, average="micro"))
    assert s["macro_ap"] == pytest.approx(average_precision_score(y, p, average="macro"))
    # The paper's interpolated macro curve is close to, not equal to, the mean of the AUCs.
    assert s["macro_auc_interpolated"] == pytest.approx(s["macro_auc"], abs=0.03)


def test_bootstrap_resamples_equal_sklearn_on_the_same_resamples():
    y, p = _data(n=120)
    n, k = y.shape
    boot = M.bootstrap(y, p, n_boot=12, seed=3)
    counts = np.concatenate(list(M._resample_counts(n, 12, 3, 12)), axis=1).astype(int)
    for b in range(12):
        idx = np.repeat(np.arange(n), counts[:, b])
        for f in range(k):
            if 0 < y[idx, f].sum() < len(idx):
                assert boot["auc"][b, f] == pytest.approx(roc_auc_score(y[idx, f], p[idx, f]))
                assert boot["ap"][b, f] == pytest.approx(average_precision_score(y[idx, f], p[idx, f]))
            else:
                assert np.isnan(boot["auc"][b, f])
        assert boot["micro_auc"][b] == pytest.approx(roc_auc_score(y[idx].ravel(), p[idx].ravel()))
        assert boot["micro_ap"][b] == pytest.approx(average_precision_score(y[idx].ravel(), p[idx].ravel()))


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    y, p = _data(n=300)
    a = M.summarize(y, p, ["A", "B", "C"], n_boot=200, seed=7)
    b = M.summarize(y, p, ["A", "B", "C"], n_boot=200, seed=7)
    c = M.summarize(y, p, ["A", "B", "C"], n_boot=200, seed=8)
    for name, e in a["per_finding"].items():
        assert e["auc_ci"][0] <= e["auc"] <= e["auc_ci"][1]
        assert e["ap_ci"][0] <= e["ap"] <= e["ap_ci"][1]
        assert e["auc_ci"] == b["per_finding"][name]["auc_ci"]
    assert a["macro_auc_ci"][0] <= a["macro_auc"] <= a["macro_auc_ci"][1]
    assert a["micro_ap_ci"][0] <= a["micro_ap"] <= a["micro_ap_ci"][1]
    assert a["per_finding"]["A"]["auc_ci"] != c["per_finding"]["A"]["auc_ci"]


def test_youden_threshold_hand_made():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.55, 0.5, 0.8, 0.9])
    # t=0.8: J = 2/3 - 0; t=0.55: 2/3 - 1/4; t=0.5: 1 - 1/4 = 0.75 (the best); t=0.3: 1 - 1/2.
    no_positives = np.zeros(7, int)
    t = M.youden_thresholds(np.c_[y, no_positives], np.c_[p, p])
    assert t[0] == 0.5 and np.isnan(t[1])


def test_finding_without_positives_is_none_with_a_note():
    y, p = _data(prevalences=(0.2, 0.0, 0.3))
    s = M.summarize(y, p, ["A", "B", "C"], thresholds=[0.5, 0.5, np.nan], n_boot=30)
    b = s["per_finding"]["B"]
    assert b["auc"] is None and b["ap"] is None and b["auc_ci"] is None and b["youden"] is None
    assert "no positive" in b["note"] and any(n.startswith("B:") for n in s["notes"])
    aucs = [roc_auc_score(y[:, f], p[:, f]) for f in (0, 2)]
    assert s["macro_auc"] == pytest.approx(np.mean(aucs))
    assert s["per_finding"]["C"]["threshold"] == 0.5  # NaN stored threshold falls back to 0.5
    json.dumps(s, allow_nan=False)  # valid JSON: no NaN anywhere


def test_binary_task_summary():
    y, p = _data(prevalences=(0.15,))
    s = M.summarize(y[:, 0], p[:, 0], ["Pneumothorax"], n_boot=30)
    assert s["task"] == "binary" and s["n_images"] == len(y)
    assert s["micro_auc"] == pytest.approx(s["per_finding"]["Pneumothorax"]["auc"])
    assert set(s["f1"]["paper_weighted"]) == {"binary", "micro", "macro", "weighted", "per_class"}


def test_shape_errors():
    with pytest.raises(ValueError, match="same 2-D shape"):
        M.as_2d(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0 or 1"):
        M.as_2d(np.full(3, 2), np.zeros(3))


def test_within_groups_auc_does_not_credit_telling_groups_apart():
    """Two sources with different prevalence, a score that only knows the source: pooled AUC is high,
    the within-source AUC is chance and its CI says so; with one group it is the plain AUC."""
    from sklearn.metrics import roc_auc_score

    from cxr.evaluation.metrics import within_groups_auc

    rng = np.random.default_rng(0)
    group = np.repeat(["images-512", "images-64"], 400)
    y = (rng.random(800) < np.where(group == "images-512", 0.4, 0.08)).astype(int)
    shortcut = (group == "images-512") + rng.normal(0, 0.1, 800)
    real = y + rng.normal(0, 0.7, 800)
    p = np.stack([shortcut, real], axis=1)
    got = within_groups_auc(np.stack([y, y], axis=1), p, group, ["shortcut", "real"], n_boot=300)
    assert roc_auc_score(y, shortcut) > 0.7
    lo, hi = got["per_finding"]["shortcut"]["auc_ci"]
    assert abs(got["per_finding"]["shortcut"]["auc"] - 0.5) < 0.08 and lo < 0.5 < hi
    assert got["per_finding"]["real"]["auc_ci"][0] > 0.75
    one = within_groups_auc(y[:, None], real[:, None], np.zeros(800), ["real"], n_boot=50)
    assert one["per_finding"]["real"]["auc"] == pytest.approx(roc_auc_score(y, real))
    assert got["groups"] == ["images-512", "images-64"]
