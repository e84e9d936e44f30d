"""Patient-grouped k-fold cross-validation (`cxr train --cv K`): every film gets an out-of-fold score.

Each film is scored by the one fold model that never saw its patient, through the Predictor
(`cxr.evaluation.evaluate.scores`, fp32), so out-of-fold numbers are the numbers users would get. From
those scores `cxr.training.oof` fits the calibration, the operating points and the assessment evidence,
and writes them into the model that ships.

The run folder: folds.json (names per fold), fold-1 .. fold-K (ordinary training runs), oof.csv,
cv.json, and model.safetensors (calibrated): the fold models as one ensemble (the mean of their logits,
`--ship ensemble`, the default) or a refit on every film (`--ship refit`, trained into refit/).
A killed run continues with --resume: finished folds are kept, an interrupted one resumes from its last.ckpt.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr.errors import CxrError, DataError
from cxr.training.train import TrainConfig, config_dict, fit

FOLDS_FILE, OOF_FILE, CV_FILE = "folds.json", "oof.csv", "cv.json"


def patient_folds(patients: Sequence, k: int, seed: int) -> np.ndarray:
    """Fold index (0 .. k-1) per film. Every patient's films land in one fold; folds are balanced in films.

    Patients are ordered by a generator seeded with `seed` (then largest first, stably), and each joins
    the fold with the fewest films so far: a function of (patients, k, seed) alone, whatever the film order.
    """
    ids = np.asarray([str(p) for p in patients])
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if k < 2:
        raise CxrError(f"cross-validation needs at least 2 folds, got {k}")
    if len(uniq) < k:
        raise DataError(f"{len(uniq)} patients cannot fill {k} patient-disjoint folds; use fewer folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    load, fold_of = np.zeros(k, dtype=np.int64), np.empty(len(uniq), dtype=np.int64)
    for u in order:
        f = int(np.argmin(load))
        fold_of[u], load[f] = f, load[f] + counts[u]
    return fold_of[inverse]


@dataclasses.dataclass
class Films:
    """The labelled films of the task among every --data source: names, patients, labels (reported columns)."""

    names: list[str]
    patients: np.ndarray
    y: np.ndarray
    findings: list[str]
    columns: list[int]
    softmax: bool

    @property
    def activation(self) -> str:
        return "softmax" if self.softmax else "sigmoid"


def labelled_films(cfg: TrainConfig) -> Films:
    from cxr.data.datasets import open_films
    from cxr.data.labels import labelled

    present = set().union(*(set(open_films(p).names) for p in cfg.data))
    _, _, info = labelled(cfg.dataset, present, cfg.task, None, metadata=cfg.metadata, max_films=cfg.max_films)
    task = info.task
    return Films(list(info.all.names), info.all.patients, task.truth(info.all.targets), list(task.reported),
                 list(task.columns), task.softmax)


def _fold_table(films: Films, k: int, seed: int) -> dict:
    fold = patient_folds(films.patients, k, seed)
    return {"folds": k, "seed": seed, "fold": {n: int(f) for n, f in zip(films.names, fold)},
            "patients": {n: str(p) for n, p in zip(films.names, films.patients)}}


def _start(cfg: TrainConfig, table: dict) -> None:
    """Write folds.json, or check that a resumed run's folds are the same ones."""
    path = cfg.out / FOLDS_FILE
    if path.exists() and not cfg.resume:
        raise CxrError(f"{path} exists: add --resume to continue that cross-validation, or pick a new --out")
    if path.exists() and json.loads(path.read_text())["fold"] != table["fold"]:
        raise CxrError(f"{path} holds other folds (other films, --seed or --cv); pick a new --out")
    if not path.exists() and cfg.resume:
        raise CxrError(f"--resume: no cross-validation in {cfg.out} ({FOLDS_FILE} missing); start without --resume")
    cfg.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))


def _train(cfg: TrainConfig, out: Path, parts: dict) -> tuple[Path, float]:
    """One training run in `out` (skipped when finished before); its model and the seconds it took."""
    final = out / "model.safetensors"
    if final.exists():  # finished before: the seconds its epochs took, from its metrics.csv
        return final, _logged_seconds(out / "metrics.csv")
    t0 = time.monotonic()
    fit(dataclasses.replace(cfg, out=out, parts=parts, resume=cfg.resume and (out / "last.ckpt").exists()))
    return final, time.monotonic() - t0


def _logged_seconds(path: Path) -> float:
    import csv

    if not path.exists():
        return 0.0
    with path.open() as f:
        return float(sum(float(row.get("seconds") or 0) for row in csv.DictReader(f)))


def score_out_of_fold(cfg: TrainConfig, films: Films, fold: np.ndarray, models: Sequence[Path],
                      batch_size: int = 32) -> dict:
    """Per (source, film) row: its fold, and its fold model's logits and probabilities through the Predictor
    (`logits_of`, fp32, the preprocessing `cxr evaluate` and `cxr predict` use; a fold model carries no
    calibration, so its probabilities are the sigmoids of those logits)."""
    import functools

    from cxr import nets as M
    from cxr.data.cache import Cache
    from cxr.data.datasets import open_films
    from cxr.inference.predictor import Predictor
    from cxr.tasks import probabilities

    row_of = {n: i for i, n in enumerate(films.names)}
    sources = [(str(p), open_films(p)) for p in cfg.data]
    rows, logits = [], []
    for f, path in enumerate(models):
        net, meta = M.load(path)
        predictor = Predictor.from_model(net, meta, backend="torch", batch_size=batch_size, precision="fp32")
        for label, source in sources:
            names = [n for n in source.names if n in row_of and fold[row_of[n]] == f]
            if names:
                readers = [functools.partial(source.read, n) for n in names]
                # as cxr.evaluation.evaluate.scores: a prepared cache holds squashed films, no light box to find
                logits.append(predictor.logits_of(readers, strict=True, find_film=not isinstance(source, Cache)))
                rows += [(label, n, row_of[n], f) for n in names]
    z = np.concatenate(logits)
    p = probabilities(z, films.activation)[:, films.columns]
    index = np.array([r[2] for r in rows])
    return {"source": [r[0] for r in rows], "image": [r[1] for r in rows], "fold": np.array([r[3] for r in rows]),
            "patient": films.patients[index], "y": films.y[index], "p": p,
            "logit": _reported_logits(z, films)}


def _reported_logits(z: np.ndarray, films: Films) -> np.ndarray:
    """Each reported finding's logit: its output's for independent findings; for exclusive classes the
    log-odds of the reported class against the rest (what a Platt fit or a threshold reads)."""
    z = np.asarray(z, np.float64)
    if not films.softmax:
        return z[:, films.columns]
    from scipy.special import logsumexp

    out = np.empty((len(z), len(films.columns)))
    for j, c in enumerate(films.columns):
        rest = np.delete(z, c, axis=1)
        out[:, j] = z[:, c] - logsumexp(rest, axis=1)
    return out


def write_oof(path: Path, oof: dict, findings: Sequence[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame({"source": oof["source"], "image": oof["image"], "patient": oof["patient"],
                          "fold": oof["fold"] + 1})
    for j, f in enumerate(findings):
        frame[f"label_{f}"] = oof["y"][:, j]
    for j, f in enumerate(findings):
        frame[f"logit_{f}"] = np.round(oof["logit"][:, j], 6)
    for j, f in enumerate(findings):
        frame[f"p_{f}"] = np.round(oof["p"][:, j], 6)
    frame.to_csv(path, index=False)


def read_oof(path: Path) -> dict:
    import pandas as pd

    frame = pd.read_csv(path, dtype={"image": str, "patient": str, "source": str})
    findings = [c[len("label_"):] for c in frame.columns if c.startswith("label_")]
    return {"source": list(frame["source"]), "image": list(frame["image"]), "patient": frame["patient"].to_numpy(),
            "fold": frame["fold"].to_numpy() - 1, "findings": findings,
            "y": frame[[f"label_{f}" for f in findings]].to_numpy(np.int8),
            "logit": frame[[f"logit_{f}" for f in findings]].to_numpy(np.float64),
            "p": frame[[f"p_{f}" for f in findings]].to_numpy(np.float32)}


SHIPS = ("ensemble", "refit", "none")


def cross_validate(cfg: TrainConfig, folds: int, *, policy: str | None = None, ship: str = "ensemble",
                   n_boot: int = 1000) -> dict:
    """Train K patient-disjoint fold models, score every film out of fold, fit calibration and operating
    points on those scores, write the shipped model (`ship`: the fold models as one ensemble, a refit on
    every film, or none) carrying them, and write cv.json; returns cv.json's dict."""
    from cxr.evaluation.calibration import DEFAULT_POLICY
    from cxr.training import oof as O

    if ship not in SHIPS:
        raise CxrError(f"--ship {ship!r}: expected one of {', '.join(SHIPS)}")
    if str(cfg.devices) not in ("auto", "1") or cfg.num_nodes != 1:
        raise CxrError("cross-validation trains its folds one after another in one process; "
                       "drop --devices/--num-nodes (or train one fold at a time with `cxr train`)")
    cfg = dataclasses.replace(cfg, out=Path(cfg.out), devices="1")
    films = labelled_films(cfg)
    table = _fold_table(films, folds, cfg.seed)
    _start(cfg, table)
    fold = np.array([table["fold"][n] for n in films.names])
    names = np.asarray(films.names, dtype=object)
    models, seconds = [], []
    for f in range(folds):
        parts = {"train": list(names[fold != f]), "val": list(names[fold == f])}
        model, took = _train(cfg, cfg.out / f"fold-{f + 1}", parts)
        models.append(model)
        seconds.append(took)
    oof = score_out_of_fold(cfg, films, fold, models)
    write_oof(cfg.out / OOF_FILE, oof, films.findings)
    fitted = O.fit_from_oof(oof, films.findings, policy or DEFAULT_POLICY, folds=folds, n_boot=n_boot,
                            softmax=films.softmax)
    report = O.cv_report(oof, films.findings, fitted, folds=folds, n_boot=n_boot)
    report.update(recipe=config_dict(cfg), seconds={"folds": [round(s, 1) for s in seconds]},
                  patients_in_two_folds=_patients_in_two_folds(oof))
    if ship == "refit":
        model, took = _train(cfg, cfg.out / "refit", {"train": list(names), "val": []})
        report["seconds"]["refit"] = round(took, 1)
        O.ship([model], cfg.out / "model.safetensors", fitted, report, folds=folds)
    elif ship == "ensemble":
        O.ship(models, cfg.out / "model.safetensors", fitted, report, folds=folds, command=cfg.command)
    report["shipped"] = ship
    (cfg.out / CV_FILE).write_text(json.dumps(report, indent=1))
    return report


def _patients_in_two_folds(oof: dict) -> int:
    seen: dict[str, set] = {}
    for p, f in zip(oof["patient"], oof["fold"]):
        seen.setdefault(str(p), set()).add(int(f))
    return sum(len(v) > 1 for v in seen.values())
