"""Labels: a data set's label table, and `labelled`, the one way training and evaluation pick their films.

`labelled(source, films, task, split)` joins the films present (by file name) with the data set's labels,
keeps the films the task takes, and splits them; `cxr train` and `cxr evaluate` both call it, so the
films and targets a model is scored on are those it was trained and validated on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cxr.errors import DataError
from cxr.tasks import Task, get_task


@dataclass(frozen=True)
class LabelTable:
    """One row per film: its file name, its patient, 0/1 per finding (N x F uint8, columns `findings`)."""

    names: tuple[str, ...]
    patients: np.ndarray
    labels: np.ndarray
    findings: tuple[str, ...]
    source: str = ""  # the file the labels came from, for messages

    def frame(self, rows=slice(None)):
        """image and patient columns, as the splits expect them."""
        import pandas as pd

        return pd.DataFrame({"image": np.asarray(self.names, dtype=object)[rows], "patient": self.patients[rows]})


def read_label_csv(path: str | Path, findings: tuple[str, ...], *, image: str = "image", patient: str = "patient",
                   labels: str = "labels", sep: str = "|", none: str = "No Finding") -> LabelTable:
    """A simple label file: one row per film with its name, patient and `sep`-joined findings (or `none`).
    Enough for a new data set's `read_labels`; NIH's richer file has its own reader (cxr.data.nih)."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the labels as CSV ({e}); give the data set's label file") from None
    missing = [c for c in (image, patient, labels) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    y = np.zeros((len(df), len(findings)), dtype=np.uint8)
    for i, text in enumerate(df[labels]):
        for name in filter(None, (t.strip() for t in text.split(sep))):
            if name == none:
                continue
            if name not in findings:
                raise DataError(f"{path}: line {i + 2}: unknown finding {name!r}; expected one of {', '.join(findings)}")
            y[i, findings.index(name)] = 1
    return LabelTable(tuple(df[image].str.strip()), df[patient].to_numpy(), y, tuple(findings), str(path))


@dataclass(frozen=True)
class TaskData:
    """A task's films (rows in order), their targets and the names of the target columns or classes."""

    name: str
    df: object  # a pandas frame of the films (image, patient, ...), or None
    targets: np.ndarray  # N x outputs uint8 (multilabel) or N int64 class indices
    class_names: tuple[str, ...]

    @property
    def multilabel(self) -> bool:
        return self.targets.ndim == 2


@dataclass(frozen=True)
class Part:
    """Films of one part, in label-table order, with the task's targets (rows) and their patients."""

    names: tuple[str, ...]
    targets: np.ndarray
    patients: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Info:
    """What else `labelled` found: the task, every labelled film of the task present, the test part,
    the split (None without one), films the labels lack, and how many the task leaves out."""

    task: Task
    all: Part
    test: Part
    split: object = None
    unknown: tuple[str, ...] = ()
    outside: int = 0
    table: LabelTable | None = field(default=None, repr=False)


class Labelled(NamedTuple):
    train: Part
    val: Part
    info: Info


def _part(all_: Part, names: Iterable[str]) -> Part:
    chosen = set(names)
    keep = np.fromiter((n in chosen for n in all_.names), dtype=bool, count=len(all_.names))
    return Part(tuple(np.asarray(all_.names, dtype=object)[keep]), all_.targets[keep], all_.patients[keep])


_TABLES: dict[tuple, LabelTable] = {}


def _read_labels(source: str, dataset, metadata: str | Path) -> LabelTable:
    """The data set's label table; the last two stay cached while their file is unchanged, because
    evaluation asks once per --data source and again per split (NIH's file takes seconds to parse)."""
    path = Path(metadata)
    try:
        stat = path.stat()
        key = (source, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:  # the reader names the missing file
        return dataset.read_labels(metadata)
    if key not in _TABLES:
        while len(_TABLES) >= 2:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = dataset.read_labels(metadata)
    return _TABLES[key]


def labelled(source: str, films: Iterable[str], task: str | Task, split: str | Mapping | None = None, *,
             metadata: str | Path, seed: int = 0, val: float | None = None, test: float | None = None,
             lists: str | Path | None = None, max_films: int | None = None) -> Labelled:
    """The labelled films among `films` (file names), split for `task`.

    source: a registered data set ("nih"). split: None (every film in train; val and test empty), a kind
    of cxr.data.splits.SPLITS re-made with seed/val/test (official: the data set's lists, from `lists` or
    beside the metadata), or explicit names {"train": [...], "val": [...], "test": [...]}.
    max_films: only the first N labelled films (smoke runs), before splitting.
    """
    from cxr.data.registry import get_dataset
    from cxr.data.splits import make_split

    dataset = get_dataset(source)
    spec = task if isinstance(task, Task) else get_task(task)
    table = _read_labels(source, dataset, metadata)
    present = set(films)
    known = set(table.names)
    unknown = tuple(sorted(present - known))
    keep, targets = spec.select(table.labels, tuple(table.findings))
    rows = np.flatnonzero(keep)
    here = np.fromiter((table.names[r] in present for r in rows), dtype=bool, count=len(rows))
    outside = len(present) - len(unknown) - int(here.sum())
    if max_films:
        here &= np.cumsum(here) <= max_films
    rows, targets = rows[here], targets[here]
    all_ = Part(tuple(table.names[r] for r in rows), targets, table.patients[rows])
    if split is None:
        parts = {"train": all_.names, "val": (), "test": ()}
        made = None
    elif isinstance(split, Mapping):
        parts, made = {p: split.get(p, ()) for p in ("train", "val", "test")}, None
    else:
        official = None
        if split == "official":
            if not hasattr(dataset, "official_lists"):
                raise DataError(f"data set {source} has no official split lists; use --split patient")
            official = dataset.official_lists(Path(lists) if lists else Path(metadata).parent, known=known)
        made = make_split(table.frame(rows), split, seed=seed, val=val, test=test, lists=official)
        parts = {"train": made.train, "val": made.val, "test": made.test}
    info = Info(spec, all_, _part(all_, parts["test"]), made, unknown, outside, table)
    return Labelled(_part(all_, parts["train"]), _part(all_, parts["val"]), info)
