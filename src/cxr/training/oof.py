"""From out-of-fold scores to an honest model: calibration, operating points, assessment evidence.

Fitted on every out-of-fold film (cxr.evaluation.calibration: Platt per finding, thresholds by a stated
policy, the not-assessed rule on the AUC's 95% CI). The figures that judge them (Brier skill, ECE, flags
per film) are cross-fitted: each fold's films are calibrated and thresholded by what the other folds'
films fitted, so they are not flattered by fitting and scoring on the same films.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr.evaluation import calibration as C
from cxr.evaluation import metrics


def _calibrated(z, p, fit) -> np.ndarray:
    return p.astype(np.float32) if fit is None else C.apply_platt(z, fit[0], fit[1])


def _threshold(y, p, policy, name) -> tuple[float, str | None]:
    try:
        return C.threshold(y, p, policy, name), None
    except C.CalibrationError as e:
        return 1.0, str(e)  # no operating point can be chosen: never flagged


def fit_from_oof(oof: dict, findings: Sequence[str], policy: str, *, folds: int, n_boot: int = 1000,
                 softmax: bool = False) -> dict:
    """Calibration (not for softmax tasks), thresholds and the cross-fitted figures, per finding."""
    y, z, p = oof["y"], oof["logit"], oof["p"]
    policy = str(C.Policy.parse(policy))
    fits, thresholds, notes = {}, {}, {}
    p_cal = np.empty_like(p)
    for j, f in enumerate(findings):
        fits[f] = None if softmax else C.fit_or_base_rate(z[:, j], y[:, j], f)
        p_cal[:, j] = _calibrated(z[:, j], p[:, j], fits[f])
        thresholds[f], note = _threshold(y[:, j], p_cal[:, j], policy, f)
        note = (fits[f] and fits[f][2]) or note
        if note:
            notes[f] = note
    crossed, flags = _cross_fitted(oof, findings, policy, folds, softmax)
    return {"within": within_source(oof, findings, n_boot), "policy": policy,
            "calibration": {f: {"a": v[0], "b": v[1]} for f, v in fits.items() if v},
            "thresholds": thresholds, "notes": notes, "p_calibrated": p_cal, "p_cross": crossed,
            "flags_cross": flags, "y_all": y, "raw": metrics.summarize(y, p, list(findings), n_boot=n_boot)}


def _sources(oof: dict) -> np.ndarray:
    return np.asarray([Path(str(s)).name for s in oof["source"]])


def within_source(oof: dict, findings: Sequence[str], n_boot: int) -> dict | None:
    """AUCs from pairs within one --data source, when there are several (None otherwise): the evidence
    the not-assessed rule reads. Sources differ in resolution and prevalence (the sample's 512-px films
    carry 1.4 findings each, its 64-px films 0.6), so a pooled AUC credits telling them apart."""
    source = _sources(oof)
    if len(set(source)) < 2:
        return None
    return metrics.within_groups_auc(oof["y"], oof["p"], source, list(findings), n_boot=n_boot)


def _evidence(fitted: dict, f: str) -> dict:
    """The AUC and 95% CI a finding is judged on: within sources where there are several, else pooled."""
    w = fitted.get("within")
    e = (w or fitted["raw"])["per_finding"][f]
    return {"auc": e.get("auc"), "auc_ci": e.get("auc_ci"),
            "basis": "within-source pairs" if w else "all out-of-fold films"}


def _within_words(fitted: dict) -> str:
    w = fitted.get("within")
    return "; AUC from pairs within each source: " + ", ".join(w["groups"]) if w else ""


def _cross_fitted(oof: dict, findings, policy: str, folds: int, softmax: bool) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and flags of each fold's films from fits on the other folds' films."""
    y, z, p, fold = oof["y"], oof["logit"], oof["p"], oof["fold"]
    crossed, flags = np.empty_like(p), np.zeros(y.shape, dtype=bool)
    for k in range(folds):
        mine, rest = fold == k, fold != k
        for j, f in enumerate(findings):
            fit = None if softmax else C.fit_or_base_rate(z[rest, j], y[rest, j], f)
            t, _ = _threshold(y[rest, j], _calibrated(z[rest, j], p[rest, j], fit), policy, f)
            crossed[mine, j] = _calibrated(z[mine, j], p[mine, j], fit)
            flags[mine, j] = crossed[mine, j] >= t
    return crossed, flags


def calibration_figures(y: np.ndarray, p: np.ndarray, findings: Sequence[str]) -> dict:
    """Brier, Brier skill against each finding's base rate, equal-mass ECE: per finding and overall."""
    per = {f: {"brier": C.brier(y[:, j], p[:, j]), "brier_skill": C.brier_skill(y[:, j], p[:, j]),
               "ece": C.ece(y[:, j], p[:, j])} for j, f in enumerate(findings)}
    ref = float(np.mean((y.mean(axis=0, keepdims=True) - y) ** 2))
    brier = C.brier(y, p)
    return {"per_finding": per, "brier": brier, "brier_skill": 1 - brier / ref if ref else None,
            "ece": C.ece(y.ravel(), p.ravel())}


def _source(folds: int, n: int) -> str:
    return f"out-of-fold predictions, {folds}-fold patient-grouped cross-validation, {n} films"


def assessment(fitted: dict, findings: Sequence[str], y: np.ndarray, folds: int) -> dict:
    """Per finding, the evidence the not-assessed rule reads (HONEST's ModelMeta.assessment)."""
    raw, cal = fitted["raw"]["per_finding"], calibration_figures(y, fitted["p_cross"], findings)["per_finding"]
    out = {}
    for j, f in enumerate(findings):
        e = {**_evidence(fitted, f), "auc_pooled": raw[f]["auc"], "n_positive": int(y[:, j].sum()),
             "n_negative": int(len(y) - y[:, j].sum()),
             "source": _source(folds, len(y)) + _within_words(fitted),
             "brier_skill": _finite(cal[f]["brier_skill"]), "ece": _finite(cal[f]["ece"])}
        if f in fitted["notes"]:
            e["note"] = fitted["notes"][f]
        out[f] = e
    return out


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _brief(summary: dict) -> dict:
    keep = ("n_images", "macro_auc", "macro_auc_ci", "micro_auc", "micro_auc_ci", "macro_ap", "macro_ap_ci")
    return {k: summary.get(k) for k in keep}


def cv_report(oof: dict, findings: Sequence[str], fitted: dict, *, folds: int, n_boot: int = 1000) -> dict:
    """cv.json: per-fold and pooled out-of-fold macro AUC with 95% CIs, per finding AUC, calibration figures."""
    y, p, fold = oof["y"], oof["p"], oof["fold"]
    per_fold = []
    for k in range(folds):
        m = fold == k
        s = metrics.summarize(y[m], p[m], list(findings), n_boot=n_boot)
        per_fold.append({"fold": k + 1, "n_patients": len(set(map(str, oof["patient"][m]))), **_brief(s)})
    raw = fitted["raw"]
    # Per --data source: sources differ in resolution and in who was sampled, so a pooled AUC can credit
    # the model for telling the sources apart; each source's own figure has no such help.
    source = _sources(oof)
    by_source = {s: _brief(metrics.summarize(y[source == s], p[source == s], list(findings), n_boot=n_boot))
                 for s in sorted(set(source))} if len(set(source)) > 1 else {}
    per_finding = {f: {k: raw["per_finding"][f].get(k) for k in ("n_positive", "auc", "auc_ci", "ap")}
                   for f in findings}
    for f in findings:
        evidence = _evidence(fitted, f)
        assessed, reason = C.assessed((evidence["auc_ci"] or [None])[0])
        per_finding[f].update(evidence_auc=evidence["auc"], evidence_auc_ci=evidence["auc_ci"],
                              evidence_basis=evidence["basis"], threshold=fitted["thresholds"][f],
                              assessed=assessed, reason=reason, calibration=fitted["calibration"].get(f))
    # What the shipped model shows: a not-assessed finding is never flagged, whatever its score.
    shown = np.array([per_finding[f]["assessed"] for f in findings], dtype=bool)
    flags = fitted["flags_cross"] & shown
    within = {k: fitted["within"][k] for k in ("macro_auc", "macro_auc_ci")} if fitted.get("within") else None
    return {
        "folds": folds, "n_films": len(y), "n_patients": len(set(map(str, oof["patient"]))),
        "pooled": _brief(raw), "by_source": by_source, "within_source": within, "per_fold": per_fold,
        "per_finding": per_finding,
        "operating_point": {"policy": fitted["policy"], "notes": fitted["notes"]},
        "calibration": {
            "method": "Platt per finding on out-of-fold logits",
            "uncalibrated": calibration_figures(y, p, findings),
            "cross_fitted": calibration_figures(y, fitted["p_cross"], findings),
        },
        "flags_per_film": {"cross_fitted": float(flags.sum(axis=1).mean()), "true": float(y.sum(axis=1).mean()),
                           "if_every_finding_were_assessed": float(fitted["flags_cross"].sum(axis=1).mean())},
    }


_RANKING = ("macro_auc", "macro_auc_ci", "macro_auc_interpolated", "micro_auc", "micro_auc_ci", "macro_ap",
            "macro_ap_ci", "micro_ap", "micro_ap_ci")


def _rank_from_raw(summary: dict, raw: dict) -> None:
    """AUC and AP from the raw out-of-fold scores. Platt with a positive slope keeps every ranking, so they
    differ only where the model gives a flat base rate, which would hide the evidence that it ranks the
    finding no better than chance; flags and F1 stay those of the calibrated scores at the thresholds."""
    summary.update({k: raw.get(k) for k in _RANKING})
    for f, e in summary["per_finding"].items():
        e.update({k: raw["per_finding"][f].get(k) for k in ("auc", "auc_ci", "ap", "ap_ci", "ap_weighted")})
    summary["notes"] = [*summary.get("notes", []), "AUC and AP: raw out-of-fold scores; flags, F1 and "
                        "thresholds: calibrated out-of-fold scores (calibration fitted on these films)"]


def ship(models: Sequence[Path], out: Path, fitted: dict, report: dict, *, folds: int, command: str = "") -> Path:
    """The shipped model with the out-of-fold calibration, thresholds, assessment and metrics in its metadata:
    one model (the refit on every film), or the fold models as one ensemble (the mean of their logits)."""
    from cxr import nets as M

    if len(models) == 1:
        net, meta = M.load(models[0])
        extra, shipped = M.load_extra(models[0]), "a refit on all films with the same recipe"
    else:
        loaded = [M.load(m) for m in models]
        net = M.ensemble([n for n, _ in loaded])
        meta = dataclasses.replace(_ensemble_meta([m for _, m in loaded], models, command), shared_body=net.shared_body)
        extra = {}  # nor its gate's statistics (see _ensemble_meta)
        shipped = (f"the ensemble of the {len(models)} fold models (the mean of their logits; each was trained "
                   f"on {len(models) - 1} of the {len(models)} folds, and these figures are each film's score by the "
                   "fold model that never saw its patient)")
    findings = list(report["per_finding"])
    summary = metrics.summarize(fitted["y_all"], fitted["p_calibrated"], findings,
                                [fitted["thresholds"][f] for f in findings],
                                n_boot=fitted["raw"]["bootstrap"]["n_boot"])
    _rank_from_raw(summary, fitted["raw"])
    summary.update(subset="out-of-fold", calibration={k: report["calibration"]["cross_fitted"][k]
                                                       for k in ("brier", "brier_skill", "ece")},
                   flags_per_film=report["flags_per_film"])
    provenance = dict(meta.provenance, shipped=shipped,
                      cv={k: report.get(k) for k in ("folds", "n_films", "n_patients", "pooled", "by_source",
                                                     "within_source")}
                      | {"per_fold_macro_auc": [f["macro_auc"] for f in report["per_fold"]]})
    meta = dataclasses.replace(
        meta, thresholds=dict(meta.thresholds, **fitted["thresholds"]), calibration=fitted["calibration"],
        operating_point={"policy": fitted["policy"], "fitted_on": _source(folds, len(fitted["y_all"])),
                         "n_films": len(fitted["y_all"])},
        assessment=assessment(fitted, findings, fitted["y_all"], folds), metrics=summary, provenance=provenance)
    return M.save(out, net, meta, extra=extra)


def _ensemble_meta(metas: Sequence, paths: Sequence[Path], command: str):
    """The fold models' metadata as one ensemble's: the members' splits and film counts kept, the command
    the cross-validation's."""
    first = metas[0]
    splits = [m.provenance.get("split", {}) for m in metas]
    names = sum((s.get("sizes") or {}).get("val", 0) for s in splits)  # each name validates one fold
    films = sum(m.provenance.get("n_train", 0) for m in metas) // max(1, len(metas) - 1)
    config = dict(first.provenance.get("config", {}), out=str(Path(paths[0]).parent.parent),
                  parts={"train": names, "val": 0}, command=command or first.provenance.get("command", ""))
    split = {"kind": "cv-ensemble", "seed": splits[0].get("seed"), "sizes": {"train": names, "val": 0, "test": 0},
             "patient_overlap": {"train-val": 0, "train-test": 0, "val-test": 0},
             "members": [dict(s, n_train=m.provenance.get("n_train")) for s, m in zip(splits, metas)]}
    provenance = dict(first.provenance, command=config["command"], config=config, split=split, n_train=films)
    provenance.pop("pos_weight_undone", None)  # each member's own
    # no gate: a member's (if any) was fitted on its own features, not on the ensemble's side by side
    return dataclasses.replace(first, members=len(metas), provenance=provenance, gate={})
