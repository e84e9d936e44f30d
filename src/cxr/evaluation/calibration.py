"""Calibration and operating points, fitted on held-out (out-of-fold or a site's own) predictions.

Why Platt scaling per finding (a logistic fit of the label on the model's logit): with tens of positives
per finding, isotonic regression memorises the few positives; two parameters per finding do not.
Operating points are chosen by a stated policy (default: specificity 0.90), because Youden's J on a few
hundred films lands thresholds near the floor and flags most findings on most films.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr.errors import CxrError

DEFAULT_POLICY = "spec:0.90"
MIN_POSITIVES = 5  # fewer than this and a finding's calibration (or threshold) is refused, not guessed
MIN_NEGATIVES = 5


class CalibrationError(CxrError):
    """Too few labelled films to fit calibration or an operating point for a finding."""


@dataclass(frozen=True)
class Policy:
    """How a threshold is chosen: 'youden', 'spec:X' (specificity at least X) or 'sens:X' (sensitivity at least X)."""

    kind: str
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> Policy:
        text = text.strip().lower()
        if text == "youden":
            return cls("youden")
        kind, _, value = text.partition(":")
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if kind not in ("spec", "sens") or not 0.0 < v < 1.0:
            raise CxrError(f"unknown operating-point policy {text!r}; use youden, spec:X or sens:X with 0 < X < 1 "
                           f"(default {DEFAULT_POLICY})")
        return cls(kind, v)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:.2f}"


def _counts(y: np.ndarray, name: str) -> None:
    pos = int(y.sum())
    neg = len(y) - pos
    if pos < MIN_POSITIVES or neg < MIN_NEGATIVES:
        raise CalibrationError(f"{name}: {pos} positive and {neg} negative films; at least {MIN_POSITIVES} of "
                               f"each are needed to fit it. Label more films with this finding, or leave it "
                               "uncalibrated (it is then reported as not assessed).")


def fit_platt(logit: np.ndarray, y: np.ndarray, name: str = "finding") -> tuple[float, float]:
    """(a, b) so that sigmoid(a * logit + b) is calibrated on these films; scikit-learn's logistic fit,
    lightly regularised so that a finding with few positives cannot get an absurd slope."""
    from sklearn.linear_model import LogisticRegression

    logit = np.asarray(logit, np.float64).reshape(-1, 1)
    y = np.asarray(y).astype(int).ravel()
    _counts(y, name)
    fit = LogisticRegression(C=1.0, solver="lbfgs").fit(logit, y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def fit_or_base_rate(logit: np.ndarray, y: np.ndarray, name: str = "finding") -> tuple[float, float, str | None]:
    """(a, b, note). Where no slope can be fitted (too few films of a class) or it comes out zero or negative
    (the model ranks the finding backwards on these films), calibration says the finding's base rate, flat:
    what is known, rather than an inverted or uncalibrated number. Such a finding is also not assessed."""
    y = np.asarray(y).astype(int).ravel()
    try:
        a, b = fit_platt(logit, y, name)
        if a > 0:
            return a, b, None
        note = "its scores rank it no better than chance here; calibration gives its base rate"
    except CalibrationError as e:
        note = f"{e} Calibration gives its base rate."
    rate = (float(y.sum()) + 0.5) / (len(y) + 1.0)  # smoothed: a finding never seen is rare, not impossible
    return 0.0, float(np.log(rate / (1 - rate))), note


def apply_platt(logits: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Calibrated probabilities, float32: sigmoid(a * logit + b) per column (numerically stable)."""
    z = np.asarray(logits, np.float64) * np.asarray(a, np.float64) + np.asarray(b, np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def threshold(y: np.ndarray, p: np.ndarray, policy: Policy | str = DEFAULT_POLICY, name: str = "finding") -> float:
    """The operating threshold on p that the policy picks on these films (a film is flagged when p >= t)."""
    from sklearn.metrics import roc_curve

    policy = Policy.parse(policy) if isinstance(policy, str) else policy
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, np.float64).ravel()
    _counts(y, name)
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is inf: "flag nothing"
    if policy.kind == "youden":
        i = int(np.argmax(tpr - fpr))
    elif policy.kind == "spec":
        ok = np.flatnonzero(1.0 - fpr >= policy.value)  # the most sensitive point that keeps the specificity
        i = int(ok[-1])
    else:
        ok = np.flatnonzero(tpr >= policy.value)  # the most specific point that reaches the sensitivity
        i = int(ok[0])
    return float(thr[i])


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    return float(np.mean((p - y) ** 2))


def brier_skill(y: np.ndarray, p: np.ndarray, base_rate: float | None = None) -> float:
    """1 - Brier / Brier of always predicting the base rate: > 0 beats knowing the prevalence, < 0 is worse.
    base_rate: the prevalence the reference predicts (default: that of these films)."""
    y = np.asarray(y, np.float64)
    rate = float(y.mean()) if base_rate is None else float(base_rate)
    ref = float(np.mean((rate - y) ** 2))
    return float("nan") if ref == 0 else 1.0 - brier(y, p) / ref


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Equal-mass bins (each holds about the same number of films, so no bin is a handful of outliers):
    per bin the mean predicted probability, the observed frequency and the count."""
    y, p = np.asarray(y, np.float64).ravel(), np.asarray(p, np.float64).ravel()
    order = np.argsort(p, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, len(p))) if len(g)]
    return {"predicted": [float(p[g].mean()) for g in groups], "observed": [float(y[g].mean()) for g in groups],
            "count": [int(len(g)) for g in groups]}


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-mass bins: the count-weighted mean |observed - predicted|."""
    r = reliability(y, p, bins)
    n = sum(r["count"])
    return float(sum(c * abs(o - q) for c, o, q in zip(r["count"], r["observed"], r["predicted"])) / max(n, 1))


def assessed(auc_ci_low: float | None) -> tuple[bool, str | None]:
    """A finding is assessed only where the model has shown it does better than chance: the lower end of its
    validation AUC's 95% CI lies above 0.5. Otherwise (or with no evidence at all) it is not assessed."""
    if auc_ci_low is None or not np.isfinite(auc_ci_low):
        return False, "no validation evidence for this finding"
    if auc_ci_low <= 0.5:
        return False, f"validation AUC 95% CI reaches {auc_ci_low:.2f}, so it may be no better than chance"
    return True, None


def assess(evidence: dict | None) -> tuple[bool, str | None]:
    """The not-assessed rule applied to one finding's evidence (ModelMeta.evidence): its AUC CI, or none."""
    if not evidence:
        return False, "no validation evidence for this finding (run cxr calibrate or cxr evaluate --update-model)"
    ci = evidence.get("auc_ci")
    ok, why = assessed(ci[0] if ci else None)
    if not ok and evidence.get("note"):
        why = str(evidence["note"])
    elif not ci:
        why = "its validation AUC has no 95% confidence interval (too few films to tell it from chance)"
    if why and evidence.get("source"):
        why = f"{why} ({evidence['source']})"
    return ok, why


def assessments(meta) -> dict[str, tuple[bool, str | None]]:
    """Per reported finding of the model: (assessed, why not). The same rule for every model."""
    from cxr.tasks import get_task

    return {f: assess(meta.evidence(f)) for f in get_task(meta.task).reported}


def figures(y: np.ndarray, p: np.ndarray, findings, bins: int = 10) -> dict:
    """Calibration per finding (Brier, Brier skill against the base rate, equal-mass ECE, reliability bins)
    and overall (every film x finding pooled), for report.json and the model card."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    per = {}
    for j, f in enumerate(findings):
        per[f] = {"brier": brier(y[:, j], p[:, j]), "brier_skill": _finite(brier_skill(y[:, j], p[:, j])),
                  "ece": ece(y[:, j], p[:, j], bins), "base_rate": float(y[:, j].mean()),
                  "reliability": reliability(y[:, j], p[:, j], bins)}
    # Overall skill: the pooled Brier against each finding's own base rate (not one rate for all findings).
    ref = float(np.mean((y.mean(axis=0) - y) ** 2)) if y.size else 0.0
    overall = {"brier": brier(y, p), "brier_skill": _finite(1.0 - brier(y, p) / ref) if ref else None,
               "ece": ece(y.ravel(), p.ravel(), bins), "reliability": reliability(y.ravel(), p.ravel(), bins),
               "bins": bins, "binning": "equal-mass"}
    return {"per_finding": per, "overall": overall}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
