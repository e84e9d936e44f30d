"""ChestX-ray14 (NIH): its metadata, split lists and boxes, label statistics, and its data-set registration.

Readers return tidy pandas frames with short column names and raise `DataError` naming the file, the
problem and the first offending line or value. Lines are counted from 1 with the header as line 1.
"""

from __future__ import annotations

import csv
import gzip
import warnings
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxr.data.labels import LabelTable, TaskData
from cxr.data.registry import register_dataset
from cxr.data.splits import OfficialLists
from cxr.errors import DataError
from cxr.findings import FINDINGS, NO_FINDING, canonical
from cxr.tasks import get_task

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

_FINDING_INDEX = {f: i for i, f in enumerate(FINDINGS)}
BOX_SPACE = 1024  # box coordinates are pixels of the 1024 x 1024 release




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


def select_task(df: pd.DataFrame, task: str) -> TaskData:
    """The films a task takes and their targets (cxr.tasks: e.g. all films, films with a finding, or
    pneumothorax vs the others)."""
    spec = get_task(task)
    keep, targets = spec.select(label_matrix(df), FINDINGS)
    return TaskData(task, df[keep].reset_index(drop=True), targets, spec.outputs)


def label_counts(y: np.ndarray) -> dict[str, int]:
    """Films carrying each finding, in FINDINGS order."""
    return {f: int(n) for f, n in zip(FINDINGS, np.asarray(y).sum(axis=0))}


def cooccurrence(y: np.ndarray) -> np.ndarray:
    """14 x 14 counts of films carrying both findings (the paper's Figure 3); the diagonal is label_counts."""
    y = np.asarray(y, dtype=np.float64)  # BLAS: integer matmul is 50x slower; float64 counts are exact
    return np.rint(y.T @ y).astype(np.int64)


@register_dataset("nih")
class ChestXray14:
    """NIH ChestX-ray14: labels from Data_Entry_2017(_v2020).csv(.gz), official lists beside it."""

    findings = FINDINGS

    def read_labels(self, metadata: str | Path) -> LabelTable:
        df = read_metadata(metadata)
        return LabelTable(tuple(df["image"]), df["patient"].to_numpy(), label_matrix(df), FINDINGS, str(metadata))

    def official_lists(self, directory: str | Path, known: Iterable[str] | None = None) -> OfficialLists:
        return read_official_lists(directory, known)
