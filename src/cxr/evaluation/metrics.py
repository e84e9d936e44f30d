"""Evaluation metrics: label and score arrays in, plain JSON-ready dicts out.

Shapes: `y` is 0/1 with shape (n_images, n_outputs) and `p` the matching probabilities. One output is the
paper's two-class task (Pneumothorax vs all, scored by the probability of Pneumothorax); more outputs are
the multi-label task (one independent probability per finding).

Undefined numbers (AUC of a finding with no positives in the data, precision with nothing predicted) are
None with a note, never NaN, so `json.dumps` writes valid JSON and a small evaluation set never crashes.

The paper's class weights (Eq. 1, scikit-learn's 'balanced': w_c = n / (2 n_c), computed on the evaluated
labels as in Eq. 6) become per-image `sample_weight`s:
- one output: image i gets w[y_i]  (Eq. 6: All others 0.5566, Pneumothorax 4.902);
- several outputs: image i gets the mean over findings f of w_f[y_if]. It reduces to Eq. 6 for one
  finding, every finding's one-vs-all weighting counts equally, and the weights still sum to n (each
  finding's balanced weights do), so their scale matches the unweighted metrics'.
Per-finding weighted F1 and AP use that finding's own weights w_f[y_if]: exactly Eq. 6 for that finding.
With balanced weights each class carries half the total weight, so the 'weighted' F1 average (weights by
weighted support) equals 'macro' in the two-class task; the paper's differing numbers (0.71 vs 0.58) cannot
come from balanced weights computed on the same labels.
F1 is 1.0 where nothing is present and nothing predicted (tp + fp + fn = 0): that is agreement, not error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score, roc_curve

F1_ZERO_DIVISION = 1.0
DEFAULT_THRESHOLD = 0.5


def as_2d(y, p) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int8 and scores as float64, both (n_images, n_outputs); 1-D inputs are one output."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    y = y.reshape(len(y), -1) if y.ndim == 1 else y
    p = p.reshape(len(p), -1) if p.ndim == 1 else p
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must have the same 2-D shape")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite")
    return y.astype(np.int8), p


def _num(x) -> float | None:
    """A JSON number, or None where it is undefined."""
    return None if x is None or not np.isfinite(x) else float(x)


def _defined(y1: np.ndarray) -> bool:
    """AUC needs both classes present."""
    return 0 < int(y1.sum()) < len(y1)


# ---- class weights (Eq. 1) and the paper's per-sample weights (Eq. 6) ----------------------------------

def class_weights(y1) -> np.ndarray:
    """[w_negative, w_positive] = n / (2 n_c) (scikit-learn 'balanced'); [1, 1] when a class is absent."""
    y1 = np.asarray(y1).ravel()
    counts = np.bincount(y1.astype(np.int64), minlength=2)[:2]
    if (counts == 0).any():
        return np.ones(2)  # nothing to balance against
    return len(y1) / (2.0 * counts)


def sample_weights(y) -> np.ndarray:
    """Per-image weights from the balanced class weights of the labels (see the module notes)."""
    y = np.asarray(y)
    y = y.reshape(len(y), -1) if y.ndim == 1 else y
    per_finding = np.stack([class_weights(y[:, f])[y[:, f]] for f in range(y.shape[1])], axis=1)
    return per_finding.mean(axis=1)


# ---- ranking metrics ------------------------------------------------------------------------------------

def auc_or_none(y1, p1) -> float | None:
    return float(roc_auc_score(y1, p1)) if _defined(np.asarray(y1)) else None


def ap_or_none(y1, p1, sample_weight=None) -> float | None:
    y1 = np.asarray(y1)
    return float(average_precision_score(y1, p1, sample_weight=sample_weight)) if y1.sum() > 0 else None


def roc_curves(y, p) -> dict:
    """Per-output (fpr, tpr) (None without both classes), micro (pooled) and the paper's macro curve."""
    y, p = as_2d(y, p)
    per = [roc_curve(y[:, f], p[:, f])[:2] if _defined(y[:, f]) else None for f in range(y.shape[1])]
    micro = roc_curve(y.ravel(), p.ravel())[:2] if _defined(y.ravel()) else None
    have = [c for c in per if c is not None]
    macro = None
    if have:
        # The paper's macro curve: every output's tpr interpolated at the union of their fprs, then averaged.
        all_fpr = np.unique(np.concatenate([fpr for fpr, _ in have]))
        mean_tpr = np.mean([np.interp(all_fpr, fpr, tpr) for fpr, tpr in have], axis=0)
        macro = (all_fpr, mean_tpr)
    return {"per_output": per, "micro": micro, "macro": macro}


def pr_curves(y, p) -> dict:
    """Per-output (recall, precision) (None without positives) and the micro-averaged (pooled) curve."""
    y, p = as_2d(y, p)

    def curve(y1, p1):
        if y1.sum() == 0:
            return None
        precision, recall, _ = precision_recall_curve(y1, p1)
        return recall, precision

    return {"per_output": [curve(y[:, f], p[:, f]) for f in range(y.shape[1])], "micro": curve(y.ravel(), p.ravel())}


def youden_thresholds(y, p) -> np.ndarray:
    """Per output, the score threshold maximising Youden's J = tpr - fpr (predict positive if p >= t).

    NaN where a finding lacks positives or negatives. Ties go to the highest threshold (fewest alarms).
    """
    y, p = as_2d(y, p)
    out = np.full(y.shape[1], np.nan)
    for f in range(y.shape[1]):
        if _defined(y[:, f]):
            fpr, tpr, thr = roc_curve(y[:, f], p[:, f], drop_intermediate=False)
            # thr[0] is +inf (nothing predicted positive): not an operating point.
            out[f] = thr[1:][np.argmax((tpr - fpr)[1:])]
    return out


# ---- bootstrap confidence intervals ---------------------------------------------------------------------

def _resample_counts(n: int, n_boot: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """(n, b) multiplicities of each image in b resampled sets of n images drawn with replacement."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        # images along axis 0: the cumulative sums below then run over contiguous rows, b at a time
        yield np.ascontiguousarray(counts.T, dtype=np.float64)


class _Ranked:
    """One output's scores sorted once, so each resample's AUC and AP is two sparse products and sums.

    A resample is a multiplicity per image; weighting by it equals duplicating images, which gives exactly
    scikit-learn's AUC and AP on the resampled arrays, ties included. Only tie groups that hold a positive
    add to either sum, so the sorted scores are cut into segments [gap 0, group 0, gap 1, group 1, ...,
    gap G]: a group is one tied score with positives, a gap the negatives between two such groups.
    """

    def __init__(self, y1: np.ndarray, p1: np.ndarray, image_of: np.ndarray, n_images: int):
        order = np.argsort(p1, kind="stable")
        ps, positive, image = p1[order], y1[order].astype(bool), image_of[order]
        new_group = np.r_[True, ps[1:] != ps[:-1]]
        starts = np.flatnonzero(new_group)
        ends = np.r_[starts[1:], len(ps)]
        has_pos = np.zeros(len(starts), dtype=bool)
        has_pos[(np.cumsum(new_group) - 1)[positive]] = True
        lo, hi = starts[has_pos], ends[has_pos]
        j = np.arange(len(ps))
        q = np.searchsorted(lo, j, side="right")  # groups starting at or before j
        in_group = (q > 0) & (j < np.r_[0, hi][q])  # before the end of the last group started
        segment = np.where(in_group, 2 * q - 1, 2 * q)
        shape = (2 * len(lo) + 1, n_images)

        def counter(mask):  # segment x image: how many of the image's elements fall in the segment
            return csr_matrix((np.ones(mask.sum()), (segment[mask], image[mask])), shape=shape)

        self.pos, self.neg = counter(positive), counter(~positive)
        self.n_segments = shape[0]

    def scores(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AUC and AP per resample (columns of counts); NaN where a resample lacks a class."""
        pos, neg = np.asarray(self.pos @ counts), np.asarray(self.neg @ counts)
        cpos, cneg = np.cumsum(pos, axis=0), np.cumsum(neg, axis=0)
        n_pos, n_neg = cpos[-1], cneg[-1]
        g = slice(1, None, 2)  # the groups
        pos_g, neg_g = pos[g], neg[g]
        pos_lo, neg_lo = cpos[g] - pos_g, cneg[g] - neg_g  # below the group
        with np.errstate(invalid="ignore", divide="ignore"):
            # Mann-Whitney: each positive beats the negatives below it and half-ties its own group.
            auc = (pos_g * (neg_lo + 0.5 * neg_g)).sum(axis=0) / (n_pos * n_neg)
            # AP = sum_k (R_k - R_{k-1}) P_k (Eq. 7); scores >= group k hold tp positives and fp negatives.
            tp, fp = n_pos - pos_lo, n_neg - neg_lo
            ap = (pos_g * tp / np.where(tp + fp > 0, tp + fp, 1.0)).sum(axis=0) / n_pos
        auc[(n_pos == 0) | (n_neg == 0)], ap[n_pos == 0] = np.nan, np.nan
        return auc, ap


def bootstrap(y, p, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC and AP of every output, and their macro and micro averages, over n_boot resamples of images.

    Every output sees the same resampled images. Resamples where an output has a single class are skipped
    for that output (NaN here); a macro value needs every output that is defined on the full data.
    Returns arrays: 'auc', 'ap' (n_boot, n_outputs); 'macro_auc', 'macro_ap', 'micro_auc', 'micro_ap' (n_boot,).
    """
    y, p = as_2d(y, p)
    n, k = y.shape
    images = np.arange(n)
    ranked = [_Ranked(y[:, f], p[:, f], images, n) for f in range(k)]
    pooled = _Ranked(y.ravel(), p.ravel(), np.repeat(images, k), n) if k > 1 else None
    rows_needed = max([n] + [r.n_segments for r in ranked + [pooled] if r is not None])
    chunk = max(1, 2_000_000 // rows_needed)  # bounds each step's arrays at ~16 MB
    auc, ap = np.full((n_boot, k), np.nan), np.full((n_boot, k), np.nan)
    micro_auc, micro_ap = np.full(n_boot, np.nan), np.full(n_boot, np.nan)
    row = 0
    for counts in _resample_counts(n, n_boot, seed, chunk):
        rows = slice(row, row + counts.shape[1])
        for f, r in enumerate(ranked):
            auc[rows, f], ap[rows, f] = r.scores(counts)
        if pooled is not None:
            micro_auc[rows], micro_ap[rows] = pooled.scores(counts)
        row += counts.shape[1]
    if pooled is None:
        micro_auc, micro_ap = auc[:, 0].copy(), ap[:, 0].copy()
    has_pos = y.sum(axis=0) > 0
    both = np.array([_defined(y[:, f]) for f in range(k)])
    macro_auc = auc[:, both].mean(axis=1) if both.any() else np.full(n_boot, np.nan)
    macro_ap = ap[:, has_pos].mean(axis=1) if has_pos.any() else np.full(n_boot, np.nan)
    return {"auc": auc, "ap": ap, "macro_auc": macro_auc, "macro_ap": macro_ap,
            "micro_auc": micro_auc, "micro_ap": micro_ap}


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the valid (non-NaN) resamples; None when fewer than 20 are valid."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if len(samples) < 20:
        return None
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


# ---- metrics at an operating threshold ------------------------------------------------------------------

def binarize(p, thresholds) -> np.ndarray:
    """0/1 predictions: positive where p >= the output's threshold (NaN thresholds use 0.5)."""
    _, p = as_2d(np.zeros(np.shape(p), dtype=np.int8), p)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    t = np.where(np.isfinite(t), t, DEFAULT_THRESHOLD)
    return (p >= t[None, :]).astype(np.int8)


def confusion_metrics(y1, pred1, sample_weight=None) -> dict:
    """Accuracy, precision, recall and F1 of one output's 0/1 predictions; None where undefined."""
    y1, pred1 = np.asarray(y1).ravel(), np.asarray(pred1).ravel()
    w = np.ones(len(y1)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    tp = float(w[(y1 == 1) & (pred1 == 1)].sum())
    fp = float(w[(y1 == 0) & (pred1 == 1)].sum())
    fn = float(w[(y1 == 1) & (pred1 == 0)].sum())
    total = float(w.sum())
    return {
        "accuracy": (total - fp - fn) / total if total else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else F1_ZERO_DIVISION,
    }


def f1_variants(y, pred, sample_weight=None) -> dict:
    """scikit-learn's F1 averages, as the paper lists them.

    One output (the two-class task): 'binary' (Pneumothorax), 'micro', 'macro', 'weighted' over the classes
    [negative, positive], and 'per_class'. Several outputs: 'micro', 'macro', 'weighted', 'samples' and
    'per_output'.
    """
    y, pred = as_2d(y, pred)
    kw = {"sample_weight": sample_weight, "zero_division": F1_ZERO_DIVISION}
    if y.shape[1] == 1:
        y1, p1 = y[:, 0], pred[:, 0].astype(np.int8)
        out = {"binary": f1_score(y1, p1, average="binary", **kw)}
        for avg in ("micro", "macro", "weighted"):
            out[avg] = f1_score(y1, p1, labels=[0, 1], average=avg, **kw)
        out["per_class"] = f1_score(y1, p1, labels=[0, 1], average=None, **kw).tolist()
    else:
        out = {avg: f1_score(y, pred, average=avg, **kw) for avg in ("micro", "macro", "weighted", "samples")}
        out["per_output"] = f1_score(y, pred, average=None, **kw).tolist()
    return {k: (float(v) if not isinstance(v, list) else [float(x) for x in v]) for k, v in out.items()}


def f1_report(y, pred) -> dict:
    """F1 averages unweighted and with the paper's per-sample class weights (Eq. 6)."""
    y, pred = as_2d(y, pred)
    return {"unweighted": f1_variants(y, pred), "paper_weighted": f1_variants(y, pred, sample_weights(y))}


# ---- everything for one evaluation ----------------------------------------------------------------------

def _per_output(y1, p1, threshold, youden, auc_s, ap_s, level) -> dict:
    n_pos = int(y1.sum())
    w = class_weights(y1)[y1]
    pred = (p1 >= threshold).astype(np.int8)
    entry = {
        "n_positive": n_pos,
        "n_negative": int(len(y1) - n_pos),
        "auc": auc_or_none(y1, p1),
        "auc_ci": percentile_ci(auc_s, level) if _defined(y1) else None,
        "ap": ap_or_none(y1, p1),
        "ap_ci": percentile_ci(ap_s, level) if n_pos else None,
        "ap_weighted": ap_or_none(y1, p1, sample_weight=w),
        "threshold": float(threshold),
        **confusion_metrics(y1, pred),
        "f1_weighted": confusion_metrics(y1, pred, sample_weight=w)["f1"],
        "youden": None,
    }
    if np.isfinite(youden):
        entry["youden"] = {"threshold": float(youden), **confusion_metrics(y1, (p1 >= youden).astype(np.int8))}
    if n_pos == 0:
        entry["note"] = "no positive films in the evaluated data: AUC and AP are undefined"
    elif n_pos == len(y1):
        entry["note"] = "no negative films in the evaluated data: AUC is undefined"
    return entry


def summarize(y, p, findings: Sequence[str], thresholds=None, *, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """Every number of an evaluation (the body of report.json). thresholds: per output, default 0.5."""
    y, p = as_2d(y, p)
    n, k = y.shape
    if len(findings) != k:
        raise ValueError(f"{len(findings)} finding names for {k} outputs")
    t = np.full(k, DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    t = np.where(np.isfinite(t), t, DEFAULT_THRESHOLD)
    youden = youden_thresholds(y, p)
    boot = bootstrap(y, p, n_boot=n_boot, seed=seed)
    per = {name: _per_output(y[:, f], p[:, f], t[f], youden[f], boot["auc"][:, f], boot["ap"][:, f], level)
           for f, name in enumerate(findings)}
    aucs = [e["auc"] for e in per.values() if e["auc"] is not None]
    aps = [e["ap"] for e in per.values() if e["ap"] is not None]
    macro_curve = roc_curves(y, p)["macro"]
    out = {
        "task": "binary" if k == 1 else "multilabel",
        "findings": list(findings),
        "n_images": int(n),
        "per_finding": per,
        # macro = mean of the defined per-finding values; micro = every (image, finding) pair pooled.
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "macro_auc_ci": percentile_ci(boot["macro_auc"], level),
        "macro_auc_interpolated": _num(_trapezoid_auc(*macro_curve)) if macro_curve else None,
        "micro_auc": auc_or_none(y.ravel(), p.ravel()),
        "micro_auc_ci": percentile_ci(boot["micro_auc"], level),
        "macro_ap": float(np.mean(aps)) if aps else None,
        "macro_ap_ci": percentile_ci(boot["macro_ap"], level),
        "micro_ap": ap_or_none(y.ravel(), p.ravel()),
        "micro_ap_ci": percentile_ci(boot["micro_ap"], level),
        "f1": f1_report(y, binarize(p, t)),
        "f1_youden": f1_report(y, binarize(p, youden)),
        "class_weights": {name: class_weights(y[:, f]).tolist() for f, name in enumerate(findings)},
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                      "method": "percentile, resampling images; single-class resamples skipped"},
        "notes": [f"{name}: {e['note']}" for name, e in per.items() if "note" in e],
    }
    return out


def within_groups_auc(y, p, groups, findings: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """AUC per output counting only positive-negative pairs from the same group (here: the same --data
    source), with a bootstrap that resamples each group on its own.

    Pooled over groups that differ in prevalence and in how their films look, an AUC also rewards telling
    the groups apart; this one cannot. Each group's AUC is weighted by its positive x negative pairs.
    """
    y, p = as_2d(y, p)
    groups = np.asarray(groups)
    names = sorted(set(groups.tolist()))
    k = y.shape[1]
    weight, point, samples = np.zeros((len(names), k)), np.zeros((len(names), k)), np.zeros((len(names), n_boot, k))
    for i, g in enumerate(names):
        m = groups == g
        pos = y[m].sum(axis=0)
        weight[i] = pos * (m.sum() - pos)
        point[i] = [auc_or_none(y[m, f], p[m, f]) or 0.0 for f in range(k)]
        samples[i] = np.nan_to_num(bootstrap(y[m], p[m], n_boot=n_boot, seed=seed + i)["auc"], nan=0.0)
    total = weight.sum(axis=0)
    defined = total > 0
    auc = np.where(defined, (weight * point).sum(axis=0) / np.where(defined, total, 1), np.nan)
    boot = np.einsum("gf,gbf->bf", weight, samples) / np.where(defined, total, 1)
    per = {name: {"auc": _num(auc[f]) if defined[f] else None,
                  "auc_ci": percentile_ci(boot[:, f], level) if defined[f] else None}
           for f, name in enumerate(findings)}
    return {"groups": names, "per_finding": per,
            "macro_auc": _num(auc[defined].mean()) if defined.any() else None,
            "macro_auc_ci": percentile_ci(boot[:, defined].mean(axis=1), level) if defined.any() else None,
            "weights": "each group's positive x negative pairs", "bootstrap": {"n_boot": n_boot, "seed": seed}}
