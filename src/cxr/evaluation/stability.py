"""`cxr evaluate --stability`: how the answers move when the same labelled films are captured badly.

Each film `cxr evaluate` scored (its scores.csv: names and labels, after split, subset and unreadable
films) is made into every perturbation of `cxr.data.capture.variants` (JPEG 70, a tilt, glare, a bad crop,
exposure, a light-box photo), seeded per film, and read by the Predictor as `cxr predict` reads a file:
the capture stage (a photo's film found and cropped, a turn undone), then the network and the gate. Per
perturbation: mean and max |dp| against the original film (every film, every scored finding), the macro
AUC, and the acceptance rate (the share predict would read rather than refuse). Written to report.json
under "stability".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Issue 14's targets for mean |dp| against the original file (held-out films judge them).
TARGETS = {"jpeg": 0.02, "glare": 0.02, "tilt": 0.04, "crop": 0.04, "exposure": 0.04, "light_box": 0.05}
_CHUNK = 16  # films whose variants are held in memory at once (7 gray films each)


def _films_in_order(sources, names: list[str]):
    """For each scored name, in order, the folder or cache it came from: a name pooled from several
    sources (the same film at 512 and 64 px) comes from them in the order given, as evaluate pooled them."""
    from cxr.data.datasets import open_films

    opened = [open_films(s) for s in sources]
    known = [set(f.names) for f in opened]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        holders = [f for f, k in zip(opened, known) if n in k]
        out.append(holders[min(seen.get(n, 0), len(holders) - 1)])
        seen[n] = seen.get(n, 0) + 1
    return out


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from cxr.evaluation.metrics import auc_or_none

    aucs = [a for j in range(y.shape[1]) if (a := auc_or_none(y[:, j], p[:, j])) is not None]
    return float(np.mean(aucs)) if aucs else None


def stability(model, sources, out_dir, *, seed: int = 0, batch_size: int = 32, device: str = "cpu",
              precision: str = "fp32", max_films: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Score every perturbation of the films in out_dir/scores.csv; add "stability" to report.json."""
    import pandas as pd

    from cxr.data import capture as aug
    from cxr.inference.predictor import Predictor

    out = Path(out_dir)
    scores = pd.read_csv(out / "scores.csv")
    if max_films:
        scores = scores.iloc[:max_films]
    names = [str(n) for n in scores["image"]]
    findings = [c[len("label_"):] for c in scores.columns if c.startswith("label_")]
    y = scores[[f"label_{f}" for f in findings]].to_numpy()
    predictor = Predictor(model, batch_size=batch_size, device=device, precision=precision)
    cols = [predictor.meta.outputs.index(f) for f in findings]
    where = _films_in_order(list(sources) if isinstance(sources, (list, tuple)) else [sources], names)
    kinds = ["original", *TARGETS]
    probs = {k: np.zeros((len(names), len(cols)), np.float32) for k in kinds}
    accepted = {k: np.zeros(len(names), bool) for k in kinds}
    for start in range(0, len(names), _CHUNK):
        part = range(start, min(start + _CHUNK, len(names)))
        made = {k: [] for k in kinds}
        for i in part:
            gray = where[i].read(names[i])
            v = aug.variants(gray, np.random.default_rng(seed + i))
            made["original"].append(gray)
            for k in TARGETS:
                made[k].append(v[k])
        for k in kinds:
            p, refused = predictor.verdicts_of(made[k], find_film=True)
            probs[k][part.start:part.stop] = p[:, cols]
            accepted[k][part.start:part.stop] = [r is None for r in refused]
        if progress:
            progress(part.stop, len(names))
    result = {"n_films": len(names), "seed": seed, "targets_mean_abs_dp": TARGETS, "per_variant": {}}
    for k in kinds:
        d = np.abs(probs[k].astype(np.float64) - probs["original"])
        result["per_variant"][k] = {
            "mean_abs_dp": float(d.mean()), "max_abs_dp": float(d.max()), "macro_auc": _macro_auc(y, probs[k]),
            "accepted": float(accepted[k].mean()),
            "meets_target": None if k == "original" else bool(d.mean() <= TARGETS[k])}
    report = out / "report.json"
    body = json.loads(report.read_text()) if report.exists() else {}
    body["stability"] = result
    report.write_text(json.dumps(body, indent=2))
    return result


def lines(result: dict) -> list[str]:
    """The table `cxr evaluate --stability` prints."""
    rows = [f"stability over {result['n_films']} films (seed {result['seed']}):",
            f"  {'variant':10} {'mean|dp|':>9} {'max|dp|':>8} {'AUC':>6} {'accepted':>9}  target"]
    for k, r in result["per_variant"].items():
        auc = "n/a" if r["macro_auc"] is None else f"{r['macro_auc']:.3f}"
        target = "" if k == "original" else (f"<= {TARGETS[k]:.2f} " + ("met" if r["meets_target"] else "NOT met"))
        rows.append(f"  {k:10} {r['mean_abs_dp']:9.3f} {r['max_abs_dp']:8.3f} {auc:>6} {r['accepted']:9.1%}  {target}")
    return rows
