"""Splitting a data set's films into train, validation and test, and the class weights of a part.

Every split is a function of (films, patients, kind, seed): `cxr train`, `cxr evaluate` and `cxr stats`
re-make the same one. Works on any data set: it needs only each film's name and patient.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.errors import CxrError, DataError
from cxr.findings import FINDINGS

SPLITS = ("random", "patient", "official")


class PatientLeakWarning(UserWarning):
    """A split puts films of the same patient on both sides, which inflates validation scores."""


@dataclass(frozen=True)
class OfficialLists:
    train_val: tuple[str, ...]
    test: tuple[str, ...]
    directory: Path


@dataclass(frozen=True)
class Split:
    """Image names per part and, per pair of parts, how many patients have films on both sides."""

    kind: str
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    patient_overlap: dict[str, int]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _by_patient(df: pd.DataFrame, rng: np.random.Generator, fractions: dict[str, float]) -> np.ndarray:
    """Part name per row: patients in seeded order fill each part in turn up to its share of the films."""
    counts = df["patient"].value_counts().sort_index()  # sorted first, so row order does not matter
    counts = counts.iloc[rng.permutation(len(counts))]
    end = np.cumsum(counts.to_numpy())
    start = end - counts.to_numpy()  # films before each patient
    part = np.full(len(counts), "train", dtype=object)
    taken = 0
    for name, fraction in fractions.items():  # patients join while the part is short of its share
        mine = (start >= taken) & (start < taken + round(fraction * len(df)))
        part[mine] = name
        taken = end[mine].max() if mine.any() else taken  # the next part starts after the last one taken
    return df["patient"].map(dict(zip(counts.index, part))).to_numpy()


def _by_image(n: int, rng: np.random.Generator, val: float, test: float) -> np.ndarray:
    # int(), as fastai's valid_pct does, gives the paper's 41,408 / 10,351 on 51,759 films
    n_val, n_test = int(val * n), int(test * n)
    part, order = np.full(n, "train", dtype=object), rng.permutation(n)
    part[order[:n_val]], part[order[n_val:n_val + n_test]] = "val", "test"
    return part


def _official(df: pd.DataFrame, rng: np.random.Generator, val: float, lists: OfficialLists | None) -> np.ndarray:
    if lists is None:
        raise ValueError("the official split needs NIH's lists (or another data set's official lists): "
                         "pass lists=nih.read_official_lists(folder)")
    in_test = df["image"].isin(set(lists.test)).to_numpy()
    in_train_val = df["image"].isin(set(lists.train_val)).to_numpy()
    neither = np.flatnonzero(~(in_test | in_train_val))
    if len(neither):
        raise DataError(f"{lists.directory}: {len(neither)} films of the metadata are in neither train_val_list.txt "
                        f"nor test_list.txt, first {df['image'].iloc[neither[0]]}; use lists of the same release")
    part = np.full(len(df), "test", dtype=object)
    part[in_train_val] = _by_patient(df[in_train_val], rng, {"val": val})  # val: a fraction of train_val
    return part


def make_split(df: pd.DataFrame, kind: str = "patient", *, seed: int = 42, val: float | None = None,
               test: float | None = None, lists: OfficialLists | None = None) -> Split:
    """Split films (a frame with columns image and patient, e.g. TaskData.df) into train, validation and test.

    random: the paper's split by image (val 0.2, no test); warns how many patients it leaks.
    patient: patient-disjoint, val 0.1 and test 0.1 of the films by default.
    official: test = NIH's test_list; val (0.1 by default) carved by patient out of NIH's train_val_list.
    Applied to a subset of the films (a task), the official lists are intersected with it.
    Fractions come from users (cxr train), so bad ones are CxrErrors; an unknown kind is a ValueError.
    """
    defaults = {"random": (0.2, 0.0), "patient": (0.1, 0.1), "official": (0.1, None)}
    if kind not in defaults:
        raise ValueError(f"unknown split {kind!r}; expected one of {', '.join(SPLITS)}")
    if kind == "official" and test is not None:
        raise CxrError("the official split takes its test set from test_list.txt; do not pass a test fraction")
    val = defaults[kind][0] if val is None else val
    test = defaults[kind][1] if test is None else test
    if not (0 <= val < 1 and 0 <= (test or 0) < 1 and val + (test or 0) < 1):
        raise CxrError(f"validation ({val}) and test ({test}) fractions must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    if kind == "random":
        part = _by_image(len(df), rng, val, test)
    elif kind == "patient":
        part = _by_patient(df, rng, {"test": test, "val": val})
    else:
        part = _official(df, rng, val, lists)
    names = {p: tuple(df["image"][part == p]) for p in ("train", "val", "test")}
    patients = {p: set(df["patient"][part == p]) for p in ("train", "val", "test")}
    pairs = (("train", "val"), ("train", "test"), ("val", "test"))
    overlap = {f"{a}-{b}": len(patients[a] & patients[b]) for a, b in pairs}
    if kind == "random" and any(overlap.values()):
        warnings.warn(f"the random split by image puts {overlap['train-val']} patients in both train and validation, "
                      "so validation scores are optimistic; use the patient or official split to measure",
                      PatientLeakWarning, stacklevel=2)
    return Split(kind, seed, names["train"], names["val"], names["test"], overlap)


def class_weights(task) -> dict[str, float] | dict[str, list[float]]:
    """The one class-weight function. `task`: films' targets and class names (a TaskData).

    Eq. 1, n_samples / (n_classes * n_c), by scikit-learn: per class for a single-label task, per finding
    [negative, positive] for multilabel. Where a class has no films, all of that target's weights are 1.0."""
    from sklearn.utils.class_weight import compute_class_weight

    columns = task.targets.T if task.multilabel else [task.targets]
    n_classes = 2 if task.multilabel else len(task.class_names)
    weights, lacking = [], []
    for name, y in zip(task.class_names if task.multilabel else [task.name], columns):
        classes = np.arange(n_classes)
        if np.isin(classes, y).all():
            weights.append([float(w) for w in compute_class_weight("balanced", classes=classes, y=y)])
        else:  # sklearn refuses; a class that never occurs contributes nothing to the loss anyway
            weights.append([1.0] * n_classes)
            lacking.append(name)
    if lacking:
        warnings.warn(f"a class has no films for {', '.join(lacking)}; their weights are set to 1.0", stacklevel=2)
    return dict(zip(task.class_names, weights)) if task.multilabel else dict(zip(task.class_names, weights[0]))


def pos_weight(y: np.ndarray, names: Iterable[str] = FINDINGS) -> np.ndarray:
    """BCE pos_weight per finding (Eq. 3's p_c): negatives / positives; 1.0, with a warning, if none."""
    pos = np.asarray(y).sum(axis=0).astype(np.float64)
    if (pos == 0).any():
        absent = [n for n, p in zip(names, pos) if p == 0]
        warnings.warn(f"no positive films for {', '.join(absent)}; their pos_weight is set to 1.0", stacklevel=2)
    return np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0)
