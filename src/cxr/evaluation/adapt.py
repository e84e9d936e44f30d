"""Refit what comes after the network (calibration, operating points, the evidence behind "assessed") on
labelled films, and write it into a copy of a checkpoint whose tensors are untouched, byte for byte.

`cxr calibrate` uses it on a site's own films (a hospital adapts the model to its machines without
retraining); `cxr evaluate --update-model` on the films it has just evaluated.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr.evaluation import calibration as C
from cxr.evaluation.calibration import DEFAULT_POLICY, CalibrationError, Policy
from cxr.tasks import get_task, probabilities

SPARSE = ("refuse", "not-assessed")  # what to do with a finding that has too few positives to fit


def _column(meta, finding: str) -> int:
    """The output column a reported finding is read from."""
    task = get_task(meta.task)
    return task.columns[task.reported.index(finding)] if task.softmax else meta.outputs.index(finding)


def sparse_findings(y: np.ndarray, findings: Sequence[str]) -> dict[str, str]:
    """finding -> why it cannot be fitted (too few positive or negative films)."""
    out = {}
    for j, f in enumerate(findings):
        pos = int(np.asarray(y)[:, j].sum())
        neg = len(y) - pos
        if pos < C.MIN_POSITIVES or neg < C.MIN_NEGATIVES:
            out[f] = (f"{pos} positive and {neg} negative films; at least {C.MIN_POSITIVES} of each are needed "
                      "to fit calibration and an operating point")
    return out


def refit_check(y: np.ndarray, findings: Sequence[str], source: str) -> None:
    """Raise CalibrationError naming every finding with too few positive (or negative) films."""
    thin = sparse_findings(y, findings)
    if thin:
        raise CalibrationError("; ".join(f"{f}: {why}" for f, why in thin.items())
                               + f" (in {source}). Label more films with these findings, or pass "
                               "--sparse not-assessed to keep them and report them as not assessed.")


def refit(meta, y: np.ndarray, logits: np.ndarray, findings: Sequence[str], *, source: str,
          policy: Policy | str = DEFAULT_POLICY, calibrate: bool = True, sparse: str = "refuse",
          n_boot: int = 1000, seed: int = 0) -> tuple[object, dict, list[str]]:
    """(the new ModelMeta, {"summary": metrics, "calibration": figures} on these films, notes).

    y: films x findings labels; logits: films x outputs raw logits (uncalibrated, as `Predictor.logits_of`
    gives them). calibrate: refit Platt per finding (else keep the model's calibration). Thresholds are
    chosen by `policy` on the (re)calibrated probabilities, and each finding's evidence (AUC with its CI)
    decides whether it is assessed. sparse: "refuse" raises CalibrationError naming every finding with
    too few positives; "not-assessed" keeps their old calibration and threshold and marks them not assessed.
    """
    from cxr.evaluation import metrics

    if sparse not in SPARSE:
        raise CalibrationError(f"unknown choice {sparse!r} for findings with too few positives; use {' or '.join(SPARSE)}")
    policy = Policy.parse(policy) if isinstance(policy, str) else policy
    y, logits = np.asarray(y).astype(np.int8), np.asarray(logits, np.float32)
    thin = sparse_findings(y, findings)
    if sparse == "refuse":
        refit_check(y, findings, source)
    notes = [f"{f}: not assessed, {why}" for f, why in thin.items()]
    softmax = get_task(meta.task).softmax
    cal = dict(meta.calibration)
    if calibrate and softmax:
        notes.append(f"task {meta.task} has exclusive classes: Platt calibration does not apply; thresholds and "
                     "assessment were refitted")
    elif calibrate:
        for j, f in enumerate(findings):
            if f not in thin:
                a, b, note = C.fit_or_base_rate(logits[:, _column(meta, f)], y[:, j], name=f)
                cal[f] = {"a": a, "b": b}
                if note:
                    notes.append(f"{f}: {note}")
    fitted = dataclasses.replace(meta, calibration=cal)
    p = probabilities(logits, fitted)[:, [_column(meta, f) for f in findings]]
    thresholds = dict(meta.thresholds)
    for j, f in enumerate(findings):
        if f not in thin:
            thresholds[f] = C.threshold(y[:, j], p[:, j], policy, name=f)
    summary = metrics.summarize(y, p, findings, [thresholds[f] for f in findings], n_boot=n_boot, seed=seed)
    figs = C.figures(y, p, findings)
    assessment = {f: evidence(summary["per_finding"][f], figs["per_finding"][f], source, thin.get(f))
                  for f in findings}
    new = dataclasses.replace(
        fitted, thresholds=thresholds, assessment={**meta.assessment, **assessment},
        operating_point={"policy": str(policy), "fitted_on": source, "n_films": int(len(y))},
        provenance={**(meta.provenance or {}),
                    "refit": {"source": source, "policy": str(policy), "calibrated": bool(calibrate and not softmax),
                              "n_films": int(len(y))}})
    return new, {"summary": summary, "calibration": figs}, notes


def evidence(entry: dict, fig: dict, source: str, note: str | None = None) -> dict:
    """One finding's assessment entry from an evaluation's per-finding metrics and calibration figures."""
    out = {"auc": entry.get("auc"), "auc_ci": entry.get("auc_ci"), "n_positive": entry.get("n_positive"),
           "n_negative": entry.get("n_negative"), "source": source,
           "brier_skill": fig.get("brier_skill"), "ece": fig.get("ece")}
    if note:
        out["auc_ci"], out["note"] = None, note  # too few films for the CI to mean anything
    return out


def write_copy(src: str | os.PathLike, dst: str | os.PathLike, meta) -> Path:
    """dst: the checkpoint at src with `meta` in its header; every tensor (the gate's too) copied unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cxr.errors import ModelError

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ModelError(f"{dst}: refusing to overwrite the model being adapted; write to another file")
    with safe_open(str(src), framework="pt", device="cpu") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["cxr"] = meta.to_json()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def calibrate(model, data: Sequence, metadata, out, *, policy: str = DEFAULT_POLICY, sparse: str = "refuse",
              batch_size: int = 32, workers: int = 0, backend: str = "auto", n_boot: int = 1000) -> dict:
    """`cxr calibrate`: score the labelled films under `data` (uncalibrated logits, through the Predictor),
    refit, write the adapted copy to `out`. Returns what was fitted, for the terminal and tests."""
    from cxr.data.datasets import open_films
    from cxr.errors import DataError
    from cxr.evaluation.evaluate import _labelled_films, _readers, _truth
    from cxr.inference.predictor import Predictor

    policy = Policy.parse(policy)
    predictor = Predictor(model, backend=backend, batch_size=batch_size, workers=workers)
    meta, notes, parts = predictor.meta, [], []
    for source in data:
        films = open_films(source)
        df, targets, _, _ = _labelled_films(films, metadata, meta, None, notes)
        y, findings, _, _ = _truth(df, targets, meta)
        parts.append((films, list(df["image"]), y))
    if not sum(len(names) for _, names, _ in parts):
        raise DataError(f"none of the films under {', '.join(map(str, data))} is labelled in {metadata}")
    if sparse == "refuse":  # before minutes of scoring: the labels alone say whether it can be fitted
        refit_check(np.concatenate([y for _, _, y in parts]), findings, f"the labels of {Path(metadata).name}")
    ys, zs = [], []
    for films, names, y in parts:
        z = predictor.logits_of(_readers(films, names))
        ok = np.isfinite(z).all(axis=1)
        ys.append(y[ok]), zs.append(z[ok])
    n = sum(len(y) for y in ys)
    where = f"cxr calibrate on {', '.join(Path(d).name for d in data)} ({n} films)"
    new, result, more = refit(meta, np.concatenate(ys), np.concatenate(zs), findings, source=where, policy=policy,
                              sparse=sparse, n_boot=n_boot)
    write_copy(predictor.path, out, new)
    return {"meta": new, "notes": notes + more, **result}
