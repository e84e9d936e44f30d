"""`cxr evaluate`: a model's scores on labelled films, then metrics (cxr.evaluation.metrics) and the report (cxr.evaluation.report).

Labels come from NIH's metadata joined by file name; films the metadata does not know are reported and
skipped, as are films that cannot be decoded. `scores` is the one batch-inference loop, shared with training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxr.errors import CxrError, DataError

SUBSETS = ("val", "test", "all")
_LISTED = 20  # skipped film names written out by name; the rest are counted


class _Inputs(Dataset):
    """(evaluation tensor, readable?) per film; an unreadable film yields zeros and False if asked to."""

    def __init__(self, films, names: Sequence[str], meta, skip_unreadable: bool):
        self.films, self.names, self.meta, self.skip = films, list(names), meta, skip_unreadable

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        from cxr.images.read import ImageError
        from cxr.data.transforms import preprocess

        try:
            return preprocess(self.films.read(self.names[i]), self.meta), True
        except ImageError:
            if not self.skip:
                raise
            size = int(self.meta.input_size)
            return torch.zeros(3, size, size), False


def scores(model, meta, films, names: Sequence[str], batch_size: int = 32, *, device=None, workers: int = 0,
           bf16: bool | None = None, channels_last: bool = True, skip_unreadable: bool = False,
           progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Probabilities (len(names) x len(meta.outputs), float32) from `cxr.nets.model.probabilities`.

    Films are read from `films` (`cxr.data.datasets.open_films`) and go through the model's own evaluation
    transform. Runs under inference_mode with channels_last (which converts `model`'s
    weights in place: same numbers, faster layout); the model's train/eval mode is restored afterwards.
    bf16: autocast to bf16; None = where it is fast (GPUs, CPUs with native bf16; fp32 elsewhere).
    skip_unreadable: rows of films that fail to decode are NaN instead of raising.
    progress: called with the number of films done after each batch.
    """
    from cxr.nets.model import probabilities

    from cxr.settings import cpu_has_fast_bf16

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if bf16 is None:
        bf16 = device.type == "cuda" or cpu_has_fast_bf16()
    was_training = model.training
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DataLoader(_Inputs(films, names, meta, skip_unreadable), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    out = np.empty((len(names), len(meta.outputs)), dtype=np.float32)
    done = 0
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for x, ok in loader:
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                p = probabilities(model(x).float(), meta).cpu().numpy()
                p[~ok.numpy()] = np.nan
                out[done:done + len(p)] = p
                done += len(p)
                if progress:
                    progress(done)
    finally:
        model.train(was_training)
    return out


def model_info(spec, meta) -> dict:
    """What report.json says about a model: where it came from and how it was made."""
    from cxr import settings as config
    path = Path(spec) if spec is not None else config.BUNDLED_MODEL
    cfg = meta.provenance.get("config", {}) if isinstance(meta.provenance, dict) else {}
    return {"name": path.stem, "path": str(path), "arch": meta.arch, "task": meta.task, "outputs": meta.outputs,
            "input_size": meta.input_size, "normalisation": meta.normalisation, "loss": cfg.get("loss"),
            "thresholds": meta.thresholds, "provenance": meta.provenance}


def _label(info: dict) -> str:
    return info["name"] + (f" ({info['loss']} loss)" if info.get("loss") else "")


def _labelled_films(films, metadata, meta, task: str | None, notes: list[str]) -> tuple:
    """(task frame of the films present, their targets, the task, names unknown to the metadata).

    Films the metadata lacks, and films outside the task (No Finding films for the paper's tasks), are noted."""
    from cxr.data import nih
    task = task or meta.task
    if task not in nih.TASKS:
        raise CxrError(f"unknown task {task!r}; expected one of {', '.join(nih.TASKS)}")
    table = nih.read_metadata(metadata)
    if (task == "pneumothorax") != (meta.task == "pneumothorax"):
        raise CxrError(f"a {meta.task} model cannot be evaluated on task {task}: the outputs differ")
    present = set(films.names)
    unknown = sorted(present - set(table["image"]))
    if unknown:
        notes.append(f"{len(unknown)} films under the data folder are not in {Path(metadata).name} and were "
                     f"skipped: {', '.join(unknown[:_LISTED])}{' ...' if len(unknown) > _LISTED else ''}")
    data = nih.select_task(table, task)
    keep = data.df["image"].isin(present).to_numpy()
    outside = len(present) - len(unknown) - int(keep.sum())
    if outside:
        notes.append(f"{outside} films are outside task {task} (e.g. 'No Finding' films) and were not evaluated")
    return data.df[keep].reset_index(drop=True), np.asarray(data.targets)[keep], task, unknown


def _split_names(df, meta, split: str, subset: str, seed: int | None, metadata, lists) -> set[str]:
    """The subset's film names: from a training run's split.json, or re-made the way `cxr train` makes it."""
    from cxr.data import nih
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
    if split not in nih.SPLITS:
        raise CxrError(f"unknown split {split!r}; expected one of {', '.join(nih.SPLITS)} or a split.json")
    cfg = meta.provenance.get("config", {}) if isinstance(meta.provenance, dict) else {}
    same = cfg.get("split") == split
    if seed is None:
        seed = int(cfg.get("seed", 0)) if same else 0  # cxr train's default seed is 0
    val, test = (cfg.get("val_fraction"), cfg.get("test_fraction")) if same else (None, None)
    official = None
    if split == "official":
        official = nih.read_official_lists(lists or Path(metadata).parent)
    parts = nih.make_split(df, split, seed=seed, val=val, test=test, lists=official)
    return set(getattr(parts, subset))


def _truth(df, targets, meta) -> tuple[np.ndarray, list[str], list[float], slice]:
    """(labels n x k, finding names, thresholds, the probability columns that are scored)."""
    from cxr.findings import FINDINGS

    if meta.task == "pneumothorax":
        return targets.reshape(-1, 1).astype(np.int8), ["Pneumothorax"], [meta.thresholds["Pneumothorax"]], slice(1, 2)
    cols = [FINDINGS.index(o) for o in meta.outputs]
    return targets[:, cols].astype(np.int8), list(meta.outputs), [meta.thresholds[o] for o in meta.outputs], slice(None)


def evaluate(model_spec, data, metadata, out_dir, split: str | None = None, *, subset: str = "val",
             seed: int | None = None, task: str | None = None, compare=None, lists=None, batch_size: int = 32,
             workers: int = 0, n_boot: int = 1000, boot_seed: int = 0, device=None, bf16: bool | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Score the labelled films under `data` and write the report into `out_dir`; returns report.json's dict.

    model_spec: a checkpoint path, or None for the bundled model. split: None (every labelled film), a
    split kind ('patient', 'official', 'random', re-made as `cxr train` makes it: seed and fractions
    default to the model's own) or a run's split.json; subset: 'val', 'test' or 'all'. compare: a
    second checkpoint scored on the same films (Fig. 21). Metrics use the model's stored thresholds.
    """
    from cxr.evaluation import metrics
    from cxr.evaluation import report
    from cxr.nets.model import load_model

    if subset not in SUBSETS:
        raise CxrError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    model, meta = load_model(model_spec)
    model_b = meta_b = None
    if compare is not None:
        model_b, meta_b = load_model(compare)
        if meta_b.outputs != meta.outputs:
            raise CxrError(f"--compare model {compare} has outputs {meta_b.outputs}, not {meta.outputs}")
    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    notes: list[str] = []
    parts = [_score_source(s, metadata, model, meta, model_b, meta_b, task, split, subset, seed, lists, notes,
                           batch_size=batch_size, device=device, workers=workers, bf16=bf16, progress=progress)
             for s in sources]
    # Several sources (e.g. the same films at 512 and 64 px) are pooled in the order given, as cxr train does.
    names = [n for part in parts for n in part["names"]]
    if not names:
        raise DataError(f"none of the labelled films under {', '.join(map(str, sources))} could be read")
    y, p = np.concatenate([part["y"] for part in parts]), np.concatenate([part["p"] for part in parts])
    p_b = np.concatenate([part["p_b"] for part in parts]) if model_b is not None else None
    findings, thresholds, task = parts[0]["findings"], parts[0]["thresholds"], parts[0]["task"]
    info = model_info(model_spec, meta)
    info_b = model_info(compare, meta_b) if model_b is not None else None
    ok_all = sum(part["n_unreadable"] for part in parts)
    unknown = sum(part["n_unknown"] for part in parts)
    films_found = sum(part["n_found"] for part in parts)
    data = ", ".join(map(str, sources))
    summary = metrics.summarize(y, p, findings, thresholds, n_boot=n_boot, seed=boot_seed)
    for j, f in enumerate(findings):  # thinned curve points, so `cxr explain --report` can draw Figs 13-20
        curve = _thinned_pr_curve(y[:, j], p[:, j])
        if curve:
            summary["per_finding"][f]["pr_curve"] = curve
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
    made = report.write_report(out, y, p, summary, compare=p_b, labels=labels)
    return json.loads(made["json"].read_text())


def _thinned_pr_curve(y1: np.ndarray, p1: np.ndarray, points: int = 200) -> dict | None:
    from sklearn.metrics import precision_recall_curve

    if y1.min() == y1.max():
        return None
    precision, recall, _ = precision_recall_curve(y1, p1)
    keep = np.unique(np.linspace(0, len(recall) - 1, min(points, len(recall))).round().astype(int))
    return {"recall": [round(float(v), 4) for v in recall[keep]],
            "precision": [round(float(v), 4) for v in precision[keep]]}


def _score_source(data, metadata, model, meta, model_b, meta_b, task, split, subset, seed, lists, notes,
                  **kw) -> dict:
    """Labels and probabilities for the films of one --data source (skipped films are noted)."""
    from cxr.data.datasets import open_films

    films = open_films(data)
    df, targets, task, unknown = _labelled_films(films, metadata, meta, task, notes)
    if split is not None and subset != "all":
        chosen = _split_names(df, meta, split, subset, seed, metadata, lists)
        keep = df["image"].isin(chosen).to_numpy()
        df, targets = df[keep].reset_index(drop=True), targets[keep]
    names = list(df["image"])
    y, findings, thresholds, cols = _truth(df, targets, meta)
    progress = kw.pop("progress", None)
    tick = (lambda done: progress(done, len(names))) if progress else None

    def run(m, mt):
        if not names:
            return np.empty((0, len(findings)), dtype=np.float32)
        return scores(m, mt, films, names, skip_unreadable=True, progress=tick, **kw)[:, cols]

    p = run(model, meta)
    p_b = run(model_b, meta_b) if model_b is not None else None
    ok = np.isfinite(p).all(axis=1) & (np.isfinite(p_b).all(axis=1) if p_b is not None else True)
    if not ok.all():
        bad = [n for n, g in zip(names, ok) if not g]
        notes.append(f"{len(bad)} films under {data} could not be read and were skipped: {', '.join(bad[:_LISTED])}")
    return {"names": [n for n, g in zip(names, ok) if g], "y": y[ok], "p": p[ok],
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
