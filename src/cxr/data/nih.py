"""ChestX-ray14 metadata, NIH's split lists and boxes; the paper's tasks, splits and statistics.

Readers return tidy pandas frames with short column names and raise `DataError` naming the file, the
problem and the first offending line or value. Lines are counted from 1 with the header as line 1.
"""

from __future__ import annotations

import csv
import gzip
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxr.errors import CxrError, DataError
from cxr.findings import FINDINGS, NO_FINDING, canonical

# NIH header names (lower-cased) -> tidy names. The bracketed headers contain commas, so the unquoted
# header splits them into two columns each; the values split the same way, so they stay aligned.
_METADATA_COLUMNS = {
    "image index": "image", "finding labels": "labels", "patient id": "patient", "follow-up #": "follow_up",
    "patient age": "age", "patient gender": "sex", "view position": "view",
    "originalimage[width": "width", "height]": "height", "originalimagepixelspacing[x": "spacing_x", "y]": "spacing_y",
}
# Everything downstream needs these; the descriptive columns are NA when a file lacks them.
REQUIRED = {"image": "Image Index", "labels": "Finding Labels", "patient": "Patient ID"}
_INTEGER = ("follow_up", "age", "width", "height")
_NUMERIC = _INTEGER + ("spacing_x", "spacing_y", "patient")

TASKS = ("multilabel", "multilabel-paper", "pneumothorax")
SPLITS = ("random", "patient", "official")
PNEUMOTHORAX_CLASSES = ("All others", "Pneumothorax")
_FINDING_INDEX = {f: i for i, f in enumerate(FINDINGS)}
BOX_SPACE = 1024  # box coordinates are pixels of the 1024 x 1024 release


class PatientLeakWarning(UserWarning):
    """A split puts films of the same patient on both sides, which inflates validation scores."""


def _read_csv(path: Path, what: str, numeric: Iterable[str] = (), **options) -> pd.DataFrame:
    """Cells as strings ('' when empty), `numeric` columns as floats (ValueError if one holds text)."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; point CXR_DATA at the ChestX-ray14 folder or pass the file")
    numeric = list(numeric)
    read = partial(pd.read_csv, path, index_col=False, skipinitialspace=True, keep_default_na=False,
                   dtype=defaultdict(lambda: str, {c: "float64" for c in numeric}),
                   na_values={c: [""] for c in numeric}, **options)
    try:
        with warnings.catch_warnings():
            # index_col=False keeps a trailing comma (the 2017 release) out of the index, but would
            # silently drop fields beyond the header: make that an error and look closer.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            try:
                return read()
            except pd.errors.ParserWarning:
                # name the surplus fields, so that _drop_unnamed can tell empty ones from misplaced values
                head = list(read(nrows=0).columns)
                return read(header=0, names=head + [f"Unnamed: {i}" for i in range(len(head), _widest(path))])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{path}: cannot read {what} as CSV ({e}); check that it is the intact NIH file") from None


def _widest(path: Path) -> int:
    """The most fields on any line."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", newline="") as f:
        return max(len(row) for row in csv.reader(f))


def _drop_unnamed(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Drop the empty columns a trailing comma makes; one holding values means the rows are misaligned."""
    unnamed = [c for c in raw.columns if not c.strip() or c.startswith("Unnamed:")]
    for c in unnamed:
        filled = raw.index[raw[c].fillna("").str.strip() != ""]
        if len(filled):
            raise DataError(f"{path}: line {filled[0] + 2} has a value ({raw.at[filled[0], c]!r}) under no column "
                            "name; the rows have more fields than the header, so the file is malformed")
    return raw.drop(columns=unnamed)


def _to_numbers(df: pd.DataFrame, col: str, path: Path, integer: bool) -> pd.Series:
    values = df[col]
    if not pd.api.types.is_numeric_dtype(values):  # the parser's fast path found text somewhere
        text = values.str.strip()
        if col == "age":
            text = text.str.removesuffix("Y")  # early releases wrote ages as '058Y'
        values = pd.to_numeric(text, errors="coerce")
        bad = values.index[values.isna() & (text != "")]
        if len(bad):
            raise DataError(f"{path}: line {bad[0] + 2}: {col} {df.at[bad[0], col]!r} is not a number; "
                            "fix or remove the row")
    fraction = values.index[values.notna() & (values % 1 != 0)] if integer else []
    if len(fraction):
        raise DataError(f"{path}: line {fraction[0] + 2}: {col} {values[fraction[0]]} should be a whole number")
    return values.astype("Int64" if integer else "float64")


def _canonical_label(text: str) -> str:
    """'A|B' in NIH spelling; ValueError says what is wrong with the text."""
    tokens = [t.strip() for t in text.split("|")]
    if tokens == [NO_FINDING]:
        return NO_FINDING
    if NO_FINDING in tokens:
        raise ValueError(f"{NO_FINDING!r} together with findings; keep one")
    return "|".join(canonical(t) for t in tokens)  # ValueError: unknown finding '...'; expected one of ...


def _canonical_labels(df: pd.DataFrame, path: Path) -> pd.Series:
    spelling = {}
    for text in df["labels"].unique():  # ~800 distinct combinations among 112,120 films: check each once
        try:
            spelling[text] = _canonical_label(text)
        except ValueError as e:
            line = df.index[df["labels"] == text][0] + 2
            raise DataError(f"{path}: line {line}: Finding Labels {text!r}: {e}") from None
    return df["labels"].map(spelling)


def _images(raw: pd.DataFrame, path: Path) -> pd.Series:
    images = raw["image"].str.strip()
    if (images == "").any():
        raise DataError(f"{path}: line {images.index[images == ''][0] + 2} has an empty Image Index")
    dup = images.duplicated(keep=False)
    if dup.any():
        first = images[dup].iloc[0]
        lines = ", ".join(str(i + 2) for i in images.index[images == first])
        raise DataError(f"{path}: image {first} appears more than once (lines {lines}); keep one row per film")
    return images


def _patients(ids: pd.Series, path: Path) -> pd.Series:
    empty = ids.isna() if pd.api.types.is_numeric_dtype(ids) else ids.str.strip() == ""
    if empty.any():
        raise DataError(f"{path}: line {ids.index[empty][0] + 2} has an empty Patient ID")
    # NIH IDs are whole numbers; other sources may use text, which groups as well.
    numbers = pd.to_numeric(ids, errors="coerce")
    return numbers.astype("int64") if (numbers % 1 == 0).all() else ids.astype(str).str.strip()


def read_metadata(path: str | Path) -> pd.DataFrame:
    """`Data_Entry_2017.csv` (or `_v2020`, or either gzipped) as one row per film.

    Columns: image, labels ('|'-joined NIH spellings, or 'No Finding'), patient, follow_up, age, sex,
    view, width, height, spacing_x, spacing_y. Image Index, Finding Labels and Patient ID must be present.
    """
    path, what = Path(path), "ChestX-ray14 metadata"
    head = _read_csv(path, what, nrows=0).columns
    try:  # the C parser converts numbers 3x faster than converting strings afterwards
        raw = _read_csv(path, what, [c for c in head if _METADATA_COLUMNS.get(c.strip().lower()) in _NUMERIC])
    except ValueError:  # text in a numeric column: read strings, and _to_numbers names the line
        raw = _read_csv(path, what)
    raw = _drop_unnamed(raw, path)
    raw.columns = [_METADATA_COLUMNS.get(c.strip().lower(), c.strip()) for c in raw.columns]
    missing = [name for col, name in REQUIRED.items() if col not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                        f"{', '.join(REQUIRED.values())} (found: {', '.join(raw.columns)})")
    df = pd.DataFrame({"image": _images(raw, path), "labels": _canonical_labels(raw, path),
                       "patient": _patients(raw["patient"], path)})
    for col in ("follow_up", "age", "sex", "view", "width", "height", "spacing_x", "spacing_y"):
        if col not in raw.columns:
            df[col] = pd.NA
        else:
            df[col] = _to_numbers(raw, col, path, col in _INTEGER) if col in _NUMERIC else raw[col]
    return df


def read_image_list(path: str | Path) -> list[str]:
    """One image name per line (NIH's `train_val_list.txt`, `test_list.txt`); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list not found; NIH ships it beside the metadata (or pass --lists DIR)")
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the split list ({e})") from None
    twice = [name for name, n in Counter(names).items() if n > 1]
    if twice:
        raise DataError(f"{path}: {len(twice)} images are listed more than once, first {twice[0]}; remove repeats")
    return names


@dataclass(frozen=True)
class OfficialLists:
    train_val: tuple[str, ...]
    test: tuple[str, ...]
    directory: Path


def read_official_lists(directory: str | Path, known: Iterable[str] | None = None) -> OfficialLists:
    """NIH's `train_val_list.txt` and `test_list.txt` from a folder; every name must be in `known`."""
    directory = Path(directory)
    lists = {name: read_image_list(directory / name) for name in ("train_val_list.txt", "test_list.txt")}
    both = set(lists["train_val_list.txt"]) & set(lists["test_list.txt"])
    if both:
        raise DataError(f"{directory}: {len(both)} images are in both train_val_list.txt and test_list.txt, "
                        f"first {min(both)}; the lists must not overlap")
    known = None if known is None else set(known)
    for name, names in lists.items():
        unknown = [n for n in names if known is not None and n not in known]
        if unknown:
            raise DataError(f"{directory / name}: {len(unknown)} images are not in the metadata, first "
                            f"{unknown[0]}; use the lists and the metadata of the same release")
    return OfficialLists(tuple(lists["train_val_list.txt"]), tuple(lists["test_list.txt"]), directory)


def read_boxes(path: str | Path, known: Iterable[str] | None = None) -> pd.DataFrame:
    """`BBox_List_2017.csv` as columns image, finding, x, y, w, h (pixels of the 1024 x 1024 film)."""
    path = Path(path)
    raw = _drop_unnamed(_read_csv(path, "bounding-box list"), path)
    head = [c.strip().lower() for c in raw.columns]
    if head[:2] != ["image index", "finding label"] or len(head) != 6 or not head[2].startswith("bbox"):
        raise DataError(f"{path}: expected the columns 'Image Index,Finding Label,Bbox [x,y,w,h]' "
                        f"but found {', '.join(raw.columns)}; is this NIH's BBox_List_2017.csv?")
    raw.columns = ["image", "finding", "x", "y", "w", "h"]
    boxes = pd.DataFrame({"image": raw["image"].str.strip()})
    boxes["finding"] = raw["finding"].str.strip().replace({"Infiltrate": "Infiltration"})  # the box file's spelling
    unknown = boxes.index[~boxes["finding"].isin(FINDINGS)]
    if len(unknown):
        raise DataError(f"{path}: line {unknown[0] + 2}: unknown finding {raw.at[unknown[0], 'finding']!r}; "
                        f"expected one of {', '.join(FINDINGS)}")
    for col in ("x", "y", "w", "h"):
        boxes[col] = _to_numbers(raw, col, path, integer=False)
    x, y, w, h = (boxes[c] for c in ("x", "y", "w", "h"))
    inside = (x >= 0) & (y >= 0) & (w > 0) & (h > 0) & (x + w <= BOX_SPACE + 1e-3) & (y + h <= BOX_SPACE + 1e-3)
    if not inside.all():
        i = inside.index[~inside][0]
        raise DataError(f"{path}: line {i + 2}: box x={x[i]}, y={y[i]}, w={w[i]}, h={h[i]} is not inside the "
                        f"{BOX_SPACE} x {BOX_SPACE} film; fix or remove the row")
    stray = sorted(set(boxes["image"]) - set(known)) if known is not None else []
    if stray:
        raise DataError(f"{path}: {len(stray)} boxed images are not in the metadata, first {stray[0]}")
    return boxes


def label_matrix(df: pd.DataFrame) -> np.ndarray:
    """N x 14 uint8, columns in FINDINGS order; a 'No Finding' film is all zeros."""
    codes, combinations = pd.factorize(df["labels"])  # ~800 distinct strings: parse each once
    rows = np.zeros((len(combinations) + 1, len(FINDINGS)), dtype=np.uint8)  # +1: code -1 (NA) is no row
    for i, text in enumerate(combinations):
        for name in text.split("|"):
            if name != NO_FINDING:
                rows[i, _FINDING_INDEX[name]] = 1
    return rows[codes]


@dataclass(frozen=True)
class TaskData:
    """A task's films (rows in order), their targets and the names of the target columns or classes."""

    name: str
    df: pd.DataFrame
    targets: np.ndarray  # N x 14 uint8 (multilabel) or N int64 class indices
    class_names: tuple[str, ...]

    @property
    def multilabel(self) -> bool:
        return self.targets.ndim == 2


def select_task(df: pd.DataFrame, task: str) -> TaskData:
    """All films, the films with a finding (the paper's multilabel set), or pneumothorax vs the others."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    y = label_matrix(df)
    if task == "multilabel":
        return TaskData(task, df.reset_index(drop=True), y, FINDINGS)
    keep = y.any(axis=1)
    sub, y = df[keep].reset_index(drop=True), y[keep]
    if task == "multilabel-paper":
        return TaskData(task, sub, y, FINDINGS)
    return TaskData(task, sub, y[:, _FINDING_INDEX["Pneumothorax"]].astype(np.int64), PNEUMOTHORAX_CLASSES)


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
        raise ValueError("the official split needs NIH's lists: pass lists=read_official_lists(folder)")
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
    """Split a task's films (TaskData.df) into train, validation and test image names.

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


def label_counts(y: np.ndarray) -> dict[str, int]:
    """Films carrying each finding, in FINDINGS order."""
    return {f: int(n) for f, n in zip(FINDINGS, np.asarray(y).sum(axis=0))}


def cooccurrence(y: np.ndarray) -> np.ndarray:
    """14 x 14 counts of films carrying both findings (the paper's Figure 3); the diagonal is label_counts."""
    y = np.asarray(y, dtype=np.float64)  # BLAS: integer matmul is 50x slower; float64 counts are exact
    return np.rint(y.T @ y).astype(np.int64)


def class_weights(task: TaskData) -> dict[str, float] | dict[str, list[float]]:
    """Eq. 1, n_samples / (n_classes * n_c), by scikit-learn: per class for a single-label task, per finding
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
