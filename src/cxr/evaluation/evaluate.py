"""`cxr evaluate`: a model's scores on labelled films, then metrics (cxr.evaluation.metrics) and the report (cxr.evaluation.report).

Labels come from NIH's metadata joined by file name; films the metadata does not know are reported and
skipped, as are films that cannot be decoded. Films are scored by the `Predictor` (`probabilities_of`):
the same preprocessing and backends as `cxr predict` and the API, fp32 unless bf16 is asked for, so the
evaluated model is the model users run and the numbers do not depend on the CPU.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cxr.errors import CxrError, DataError

SUBSETS = ("val", "test", "all")
_LISTED = 20  # skipped film names written out by name; the rest are counted


def scores(model, meta, films, names: Sequence[str], batch_size: int = 32, *, backend: str = "torch",
           precision: str = "fp32", device: str = "cpu", workers: int = 0, skip_unreadable: bool = False,
           progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Probabilities (len(names) x len(meta.outputs), float32) of a model in memory, through the Predictor.

    Films are read from `films` (`cxr.data.datasets.open_films`) and scored as `cxr predict` scores them
    (`Predictor.from_model(...).probabilities_of`). The model is put in eval mode and channels_last for
    the pass (same numbers) and its train/eval mode is restored afterwards.
    skip_unreadable: rows of films that fail to decode are NaN instead of raising.
    progress: called with the number of films done after each batch.
    """
    from cxr.inference.predictor import Predictor

    was_training = model.training
    try:
        predictor = Predictor.from_model(model, meta, backend=backend, batch_size=batch_size, precision=precision,
                                         device=device, workers=workers)
        return predictor.probabilities_of(_readers(films, names), strict=not skip_unreadable, progress=progress,
                                          find_film=not _is_cache(films))
    finally:
        model.train(was_training)


def _is_cache(films) -> bool:
    """A `cxr prepare` cache holds films already (squashed to a square: a photo's light box would be lost
    there anyway), so the search for a light box is skipped; orientation still applies, as in predict."""
    from cxr.data.cache import Cache

    return isinstance(films, Cache)


def _readers(films, names: Sequence[str]) -> list[Callable[[], np.ndarray]]:
    """How to read each film: called in the Predictor's decode threads."""
    return [functools.partial(films.read, n) for n in names]


def model_info(spec, meta) -> dict:
    """What report.json says about a model: where it came from and how it was made."""
    from cxr.nets import resolve_model
    path = resolve_model(spec)
    cfg = meta.provenance.get("config", {}) if isinstance(meta.provenance, dict) else {}
    return {"name": path.stem, "path": str(path), "arch": meta.arch, "task": meta.task, "outputs": meta.outputs,
            "input_size": meta.input_size, "normalisation": meta.normalisation, "loss": cfg.get("loss"),
            "thresholds": meta.thresholds, "provenance": meta.provenance}


def _label(info: dict) -> str:
    return info["name"] + (f" ({info['loss']} loss)" if info.get("loss") else "")


def _dataset(meta) -> str:
    """The data set the model was trained on (its label file is --metadata); NIH for older checkpoints."""
    cfg = meta.provenance.get("config", {}) if isinstance(meta.provenance, dict) else {}
    return cfg.get("dataset") or "nih"


def _labelled_films(films, metadata, meta, task: str | None, notes: list[str]) -> tuple:
    """(frame of the task's films present, their targets, the task, names unknown to the metadata).

    Films the metadata lacks, and films outside the task (No Finding films for the paper's tasks), are noted."""
    import pandas as pd

    from cxr.data.labels import labelled
    from cxr.tasks import get_task

    task = task or meta.task
    spec, own = get_task(task), get_task(meta.task)
    if spec.activation != own.activation or not set(meta.outputs) <= set(spec.outputs):
        raise CxrError(f"a {meta.task} model cannot be evaluated on task {task}: the outputs differ")
    _, _, info = labelled(_dataset(meta), films.names, spec, None, metadata=metadata)
    unknown = list(info.unknown)
    if unknown:
        notes.append(f"{len(unknown)} films under the data folder are not in {Path(metadata).name} and were "
                     f"skipped: {', '.join(unknown[:_LISTED])}{' ...' if len(unknown) > _LISTED else ''}")
    if info.outside:
        notes.append(f"{info.outside} films are outside task {task} (e.g. 'No Finding' films) and were not evaluated")
    df = pd.DataFrame({"image": list(info.all.names), "patient": info.all.patients})
    df.attrs["task"] = task  # _split_names re-makes the split on these films, _truth reads their targets
    return df, info.all.targets, task, unknown


def _split_names(df, meta, split: str, subset: str, seed: int | None, metadata, lists) -> set[str]:
    """The subset's film names: from a training run's split.json, or re-made the way `cxr train` makes it."""
    from cxr.data.labels import labelled
    from cxr.data.splits import SPLITS

    if split == "model":  # the film names the checkpoint recorded for this subset (the bundled model does)
        recorded = (meta.provenance.get("split") or {}).get(subset)
        if not recorded:
            raise CxrError(f"the model records no {subset!r} film names; pass the run's split.json as --split")
        return set(recorded)
    if split.endswith(".json"):
        try:
            return set(json.loads(Path(split).read_text())[subset])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{split}: not a split.json with a {subset!r} list of film names ({e})") from None
    if split not in SPLITS:
        raise CxrError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or a split.json")
    cfg = meta.provenance.get("config", {}) if isinstance(meta.provenance, dict) else {}
    same = cfg.get("split") == split
    if seed is None:
        seed = int(cfg.get("seed", 0)) if same else 0  # cxr train's default seed is 0
    val, test = (cfg.get("val_fraction"), cfg.get("test_fraction")) if same else (None, None)
    train_part, val_part, info = labelled(_dataset(meta), df["image"], df.attrs.get("task", meta.task), split,
                                          metadata=metadata, seed=seed, val=val, test=test, lists=lists)
    return set({"train": train_part, "val": val_part, "test": info.test}[subset].names)


def _truth(df, targets, meta) -> tuple[np.ndarray, list[str], list[float], slice | list[int]]:
    """(labels n x k, finding names, thresholds, the probability columns that are scored)."""
    from cxr.tasks import get_task

    own, spec = get_task(meta.task), get_task(df.attrs.get("task", meta.task))
    if own.softmax:  # exclusive classes: score the reported class(es), e.g. Pneumothorax, not "All others"
        shown = list(own.reported)
        return own.truth(targets), shown, [meta.thresholds[o] for o in shown], list(own.columns)
    cols = [spec.outputs.index(o) for o in meta.outputs]
    return targets[:, cols].astype(np.int8), list(meta.outputs), [meta.thresholds[o] for o in meta.outputs], slice(None)


def evaluate(model_spec, data, metadata, out_dir, split: str | None = None, *, subset: str = "val",
             seed: int | None = None, task: str | None = None, compare=None, lists=None, batch_size: int = 32,
             workers: int = 0, n_boot: int = 1000, boot_seed: int = 0, device: str = "cpu", backend: str = "auto",
             precision: str = "fp32", progress: Callable[[int, int], None] | None = None,
             update_model=None, operating_point: str | None = None, calibrate: bool = False,
             sparse: str = "not-assessed") -> dict:
    """Score the labelled films under `data` and write the report into `out_dir`; returns report.json's dict.

    model_spec: a checkpoint path, or None for the bundled model. split: None (every labelled film), a
    split kind ('patient', 'official', 'random', re-made as `cxr train` makes it: seed and fractions
    default to the model's own) or a run's split.json; subset: 'val', 'test' or 'all'. compare: a
    second checkpoint scored on the same films (Fig. 21). Metrics use the model's stored thresholds.
    backend, precision, device: as for `Predictor` (fp32 by default; with bf16 its measured max |dp|
    against fp32 is in report.json's "inference" and in the notes).
    update_model: write a copy of the model to this path whose assessment evidence, and thresholds by
    `operating_point` (default: the model's policy, else spec:0.90), come from this evaluation; with
    `calibrate` its Platt calibration too (sparse: what to do with findings too thin to fit, as in adapt).
    """
    from cxr.evaluation import calibration, metrics
    from cxr.evaluation import report
    from cxr.inference.predictor import Predictor

    if subset not in SUBSETS:
        raise CxrError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    how = {"backend": backend, "precision": precision, "device": device, "batch_size": batch_size,
           "workers": workers}
    predictor = Predictor(model_spec, **how)
    meta, meta_b, predictor_b = predictor.meta, None, None
    if compare is not None:
        predictor_b = Predictor(compare, **how)
        meta_b = predictor_b.meta
        if meta_b.outputs != meta.outputs:
            raise CxrError(f"--compare model {compare} has outputs {meta_b.outputs}, not {meta.outputs}")
    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    notes: list[str] = []
    parts = [_score_source(s, metadata, predictor, predictor_b, task, split, subset, seed, lists, notes,
                           progress=progress)
             for s in sources]
    # Several sources (e.g. the same films at 512 and 64 px) are pooled in the order given, as cxr train does.
    names = [n for part in parts for n in part["names"]]
    if not names:
        raise DataError(f"none of the labelled films under {', '.join(map(str, sources))} could be read")
    y, p = np.concatenate([part["y"] for part in parts]), np.concatenate([part["p"] for part in parts])
    p_b = np.concatenate([part["p_b"] for part in parts]) if predictor_b is not None else None
    findings, thresholds, task = parts[0]["findings"], parts[0]["thresholds"], parts[0]["task"]
    info = model_info(model_spec, meta)
    info_b = model_info(compare, meta_b) if predictor_b is not None else None
    ok_all = sum(part["n_unreadable"] for part in parts)
    unknown = sum(part["n_unknown"] for part in parts)
    films_found = sum(part["n_found"] for part in parts)
    data = ", ".join(map(str, sources))
    summary = metrics.summarize(y, p, findings, thresholds, n_boot=n_boot, seed=boot_seed)
    for j, f in enumerate(findings):  # thinned curve points, so `cxr explain --report` can draw Figs 13-20
        curve = _thinned_pr_curve(y[:, j], p[:, j])
        if curve:
            summary["per_finding"][f]["pr_curve"] = curve
    summary["calibration"] = calibration.figures(y, p, findings)
    summary["flags"] = _flags(y, p, findings, thresholds, predictor.assessed)
    summary["operating_point"] = dict(meta.operating_point) or None
    summary["inference"] = _inference_info(predictor)
    if predictor.measured is not None:
        notes.append(f"scored in {predictor.measured} (fp32 is the default; the numbers above are bf16's)")
    summary["notes"] = notes + summary["notes"]
    summary["model"] = info
    summary["data"] = {"path": str(data), "metadata": str(metadata), "task": task, "split": split,
                       "subset": subset if split else "all", "seed": seed, "n_films_found": films_found,
                       "n_not_in_metadata": unknown, "n_unreadable": ok_all,
                       "thresholds": "stored in the model (Youden thresholds on these films are reported too)"}
    labels = (_label(info), _label(info_b)) if info_b else ("model", "comparison")
    if p_b is not None:
        t_b = [meta_b.thresholds[f] for f in findings]
        summary["compare"] = {"model": info_b, "labels": list(labels),
                              "summary": metrics.summarize(y, p_b, findings, t_b, n_boot=n_boot, seed=boot_seed)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_scores(out / "scores.csv", names, findings, y, p)
    if update_model is not None:
        z = np.concatenate([part["z"] for part in parts])
        summary["updated_model"] = _update_model(predictor, y, z, findings, data, update_model, operating_point,
                                                 calibrate, sparse, n_boot, boot_seed, notes=summary["notes"])
    made = report.write_report(out, y, p, summary, compare=p_b, labels=labels)
    return json.loads(made["json"].read_text())


def _flags(y, p, findings, thresholds, assessed) -> dict:
    """Flagged findings per film (above threshold and assessed: what a user is shown as positive) against
    the true findings per film: a model that flags many more than there are cries wolf."""
    ok = np.array([assessed.get(f, (False, None))[0] for f in findings], bool)
    flagged = (p >= np.asarray(thresholds, np.float64)) & ok
    return {"flagged_per_film": float(flagged.sum(axis=1).mean()) if len(y) else None,
            "true_per_film": float(np.asarray(y).sum(axis=1).mean()) if len(y) else None,
            "flagged_share": {f: float(flagged[:, j].mean()) for j, f in enumerate(findings)},
            "not_assessed": {f: assessed[f][1] for f in findings if f in assessed and not assessed[f][0]}}


def _update_model(predictor, y, z, findings, data, out, operating_point, calibrate, sparse, n_boot, seed,
                  notes) -> dict:
    """`--update-model`: the evaluated model, its post-network part refitted on these films, written to out."""
    from cxr.evaluation import adapt
    from cxr.evaluation.calibration import DEFAULT_POLICY

    meta = predictor.meta
    policy = operating_point or meta.policy or DEFAULT_POLICY
    source = f"cxr evaluate on {data} ({len(y)} films)"
    new, _, more = adapt.refit(meta, y, z, findings, source=source, policy=policy, calibrate=calibrate,
                               sparse=sparse, n_boot=n_boot, seed=seed)
    notes.extend(more)
    path = adapt.write_copy(predictor.path, out, new)
    return {"path": str(path), "policy": new.policy, "calibrated": bool(calibrate),
            "thresholds": new.thresholds}


def _thinned_pr_curve(y1: np.ndarray, p1: np.ndarray, points: int = 200) -> dict | None:
    from sklearn.metrics import precision_recall_curve

    if y1.min() == y1.max():
        return None
    precision, recall, _ = precision_recall_curve(y1, p1)
    keep = np.unique(np.linspace(0, len(recall) - 1, min(points, len(recall))).round().astype(int))
    return {"recall": [round(float(v), 4) for v in recall[keep]],
            "precision": [round(float(v), 4) for v in precision[keep]]}


def _inference_info(predictor) -> dict:
    """How the films were scored, for report.json: the backend and the arithmetic (and bf16's measured cost)."""
    m = predictor.measured
    return {"backend": predictor.backend, "precision": predictor.precision,
            "max_abs_dp_vs_fp32": None if m is None else m.max_abs_dp, "films_checked": None if m is None else m.films}


def _score_source(data, metadata, predictor, predictor_b, task, split, subset, seed, lists, notes,
                  progress=None) -> dict:
    """Labels and probabilities for the films of one --data source (skipped films are noted)."""
    from cxr.data.datasets import open_films
    from cxr.tasks import probabilities

    films = open_films(data)
    meta = predictor.meta
    df, targets, task, unknown = _labelled_films(films, metadata, meta, task, notes)
    if split is not None and subset != "all":
        chosen = _split_names(df, meta, split, subset, seed, metadata, lists)
        keep = df["image"].isin(chosen).to_numpy()
        df, targets = df[keep].reset_index(drop=True), targets[keep]
    names = list(df["image"])
    y, findings, thresholds, cols = _truth(df, targets, meta)
    tick = (lambda done: progress(done, len(names))) if progress else None

    def run(pred):
        """(probabilities of the scored columns, raw logits of every output): calibrated by tasks.probabilities
        as Predictor.probabilities_of does, the logits kept for --update-model."""
        if not names:
            return np.empty((0, len(findings)), np.float32), np.empty((0, len(pred.meta.outputs)), np.float32)
        z = pred.logits_of(_readers(films, names), progress=tick, find_film=not _is_cache(films))
        out = np.full(z.shape, np.nan, np.float32)
        good = np.isfinite(z).all(axis=1)
        out[good] = probabilities(z[good], pred.meta)
        return out[:, cols], z

    p, z = run(predictor)
    p_b = run(predictor_b)[0] if predictor_b is not None else None
    ok = np.isfinite(p).all(axis=1) & (np.isfinite(p_b).all(axis=1) if p_b is not None else True)
    if not ok.all():
        bad = [n for n, g in zip(names, ok) if not g]
        notes.append(f"{len(bad)} films under {data} could not be read and were skipped: {', '.join(bad[:_LISTED])}")
    return {"names": [n for n, g in zip(names, ok) if g], "y": y[ok], "p": p[ok], "z": z[ok],
            "p_b": p_b[ok] if p_b is not None else None, "findings": findings, "thresholds": thresholds,
            "task": task, "n_unreadable": int((~ok).sum()), "n_unknown": len(unknown), "n_found": len(films.names)}


def _write_scores(path: Path, names, findings, y, p) -> None:
    """Per film: the labels and the probabilities, for anyone who wants to recompute something."""
    import pandas as pd

    frame = pd.DataFrame({"image": names})
    for j, f in enumerate(findings):
        frame[f"label_{f}"] = y[:, j]
    for j, f in enumerate(findings):
        frame[f"p_{f}"] = np.round(p[:, j], 6)
    frame.to_csv(path, index=False)
