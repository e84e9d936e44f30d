"""`cxr stats`: ChestX-ray14 counts, the co-occurrence matrix (paper Fig. 3), class weights and splits."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Optional

import typer

from cxr.tasks import task_names

METADATA_NAME = "Data_Entry_2017_v2020.csv.gz"


# The tasks come from their registry (cxr.tasks has no pandas); the split kinds mirror cxr.data.splits.SPLITS
# (a test keeps them equal), which is imported inside the command so that `cxr --help` does not pay for pandas.
Task = enum.Enum("Task", {name: name for name in task_names()}, type=str)


class SplitKind(str, enum.Enum):
    random = "random"
    patient = "patient"
    official = "official"


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)


def stats(
    metadata: Optional[Path] = typer.Option(
        None, "--metadata", help=f"Data_Entry_2017[_v2020].csv[.gz]; default: {METADATA_NAME} in $CXR_DATA."
    ),
    task: Task = typer.Option("multilabel", "--task", help="Which films and targets to count."),
    split: Optional[SplitKind] = typer.Option(None, "--split", help="Also split the task's films and report it."),
    seed: int = typer.Option(42, "--seed", help="Seed of the split (the paper used 42)."),
    lists: Optional[Path] = typer.Option(
        None, "--lists", help="Folder with train_val_list.txt and test_list.txt; default: beside the metadata."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the co-occurrence heatmap (Figure 3) as PNG."),
) -> None:
    """Label counts, co-occurrences, class weights (Eq. 1), BCE pos_weight and, with --split, a split."""
    import warnings

    from cxr.data import nih
    from cxr.settings import data_dir

    metadata = metadata or data_dir() / METADATA_NAME
    df = nih.read_metadata(metadata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = summarise(df, task.value, split.value if split else None, seed, lists or metadata.parent)
    # the user's warnings (a leaking split, an absent class), not libraries' deprecation notices
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    summary = {"metadata": str(metadata), **summary, "warnings": notes}
    if plot:
        write_heatmap(summary["cooccurrence"], plot)
        summary["plot"] = str(plot)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        show(summary)
    for message in summary["warnings"]:
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def summarise(df, task: str, split: str | None, seed: int, lists_dir: Path) -> dict[str, Any]:
    """Everything `cxr stats` reports, as JSON-ready values."""
    from cxr.data import nih, splits
    from cxr.findings import FINDINGS

    data = nih.select_task(df, task)
    y = data.targets if data.multilabel else nih.label_matrix(data.df)
    out: dict[str, Any] = {
        "images": len(df),
        "patients": int(df["patient"].nunique()),
        "with_finding": int(nih.label_matrix(df).any(axis=1).sum()),
        "task": {"name": task, "images": len(data.df), "patients": int(data.df["patient"].nunique()),
                 "classes": list(data.class_names)},
        "label_counts": nih.label_counts(y),
        "cooccurrence": {"labels": list(FINDINGS), "matrix": nih.cooccurrence(y).tolist()},
        "class_weights": splits.class_weights(data),
        "pos_weight": {f: round(float(w), 6) for f, w in zip(FINDINGS, splits.pos_weight(y))},
    }
    if not data.multilabel:
        out["task"]["class_counts"] = _class_counts(data.targets, data.class_names)
    if split:
        lists = nih.read_official_lists(lists_dir, known=df["image"]) if split == "official" else None
        out["split"] = _split_summary(data, splits.make_split(data.df, split, seed=seed, lists=lists))
    return out


def _class_counts(targets, class_names) -> dict[str, int]:
    import numpy as np

    return {c: int(n) for c, n in zip(class_names, np.bincount(targets, minlength=len(class_names)))}


def _split_summary(data, split) -> dict[str, Any]:
    patient = dict(zip(data.df["image"], data.df["patient"]))
    parts = {"train": split.train, "val": split.val, "test": split.test}
    out: dict[str, Any] = {
        "kind": split.kind,
        "seed": split.seed,
        "sizes": split.sizes(),
        "patients": {p: len({patient[i] for i in names}) for p, names in parts.items()},
        "patient_overlap": split.patient_overlap,
    }
    if not data.multilabel:  # for one-vs-rest, how many of each class every part holds
        target = dict(zip(data.df["image"], data.targets))
        out["class_counts"] = {p: _class_counts([target[i] for i in names], data.class_names)
                               for p, names in parts.items()}
    return out


# --- output -------------------------------------------------------------------------------------------


def _alphabetical(cooc: dict[str, Any]) -> tuple[list[str], list[list[int]]]:
    """Rows and columns in the alphabetical order of the paper's Figure 3."""
    order = sorted(range(len(cooc["labels"])), key=lambda i: cooc["labels"][i].lower())
    return [cooc["labels"][i] for i in order], [[cooc["matrix"][i][j] for j in order] for i in order]


def show(summary: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    task = summary["task"]
    overview = Table(title="ChestX-ray14", box=box.SIMPLE, show_header=False)
    for name, value in (("films", summary["images"]), ("patients", summary["patients"]),
                        ("films with a finding", summary["with_finding"]),
                        (f"task {task['name']}: films", task["images"]), ("task patients", task["patients"])):
        overview.add_row(name, f"{value:,}")
    for name, count in task.get("class_counts", {}).items():
        overview.add_row(f"class {name}", f"{count:,}  weight {summary['class_weights'][name]:.4f}")
    console.print(overview)

    per_finding = "class_counts" not in task  # multilabel: Eq. 1 weights [negative, positive] per finding
    labels = Table(title="Findings", box=box.SIMPLE)
    for col in ("finding", "films", "% of task", "pos_weight", *(("weight neg", "weight pos") if per_finding else ())):
        labels.add_column(col, justify="left" if col == "finding" else "right")
    for finding, count in summary["label_counts"].items():
        weights = summary["class_weights"][finding] if per_finding else []
        labels.add_row(finding, f"{count:,}", f"{100 * count / max(task['images'], 1):.1f}",
                       f"{summary['pos_weight'][finding]:.3f}", *(f"{w:.4f}" for w in weights))
    console.print(labels)

    for table in _cooccurrence_tables(summary["cooccurrence"], console.width):
        console.print(table)
    if "split" in summary:
        console.print(_split_table(summary["split"]))


# Short names, so that the 14 x 14 matrix fits a terminal
_SHORT = {"Atelectasis": "Atel", "Cardiomegaly": "Card", "Consolidation": "Cons", "Edema": "Edem",
          "Effusion": "Effu", "Emphysema": "Emph", "Fibrosis": "Fibr", "Hernia": "Hern", "Infiltration": "Infi",
          "Mass": "Mass", "Nodule": "Nodu", "Pleural_Thickening": "PlTh", "Pneumonia": "Pnia", "Pneumothorax": "Ptx"}


def _cooccurrence_tables(cooc: dict[str, Any], width: int) -> list:
    """The matrix in Figure 3's order: one table, or two halves of the columns on a narrow terminal."""
    from rich import box
    from rich.table import Table

    names, matrix = _alphabetical(cooc)
    short = [_SHORT.get(n, n[:4]) for n in names]
    half = (len(names) + 1) // 2
    column_sets = [range(len(names))] if width >= 6 * len(names) + 12 else [range(half), range(half, len(names))]
    tables = []
    for k, columns in enumerate(column_sets):
        table = Table(title="Co-occurrences (films with both; diagonal: films with the finding)" if k == 0 else None,
                      box=box.SIMPLE, padding=(0, 1), caption=", ".join(f"{s} {n}" for s, n in zip(short, names))
                      if k == len(column_sets) - 1 else None)
        table.add_column("")
        for j in columns:
            table.add_column(short[j], justify="right", no_wrap=True)
        for name, row in zip(short, matrix):
            table.add_row(name, *(str(row[j]) for j in columns))
        tables.append(table)
    return tables


def _split_table(split: dict[str, Any]):
    from rich import box
    from rich.table import Table

    overlap = ", ".join(f"{pair} {n}" for pair, n in split["patient_overlap"].items())
    table = Table(title=f"Split {split['kind']} (seed {split['seed']})", caption=f"patients shared: {overlap}",
                  box=box.SIMPLE)
    for col in ("part", "films", "patients", *split.get("class_counts", {}).get("train", {})):
        table.add_column(col, justify="left" if col == "part" else "right")
    for part, size in split["sizes"].items():
        counts = split.get("class_counts", {}).get(part, {})
        table.add_row(part, f"{size:,}", f"{split['patients'][part]:,}", *(f"{n:,}" for n in counts.values()))
    return table


def write_heatmap(cooc: dict[str, Any], path: Path) -> None:
    """The co-occurrence matrix as an annotated heatmap PNG, laid out like the paper's Figure 3."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    from cxr.errors import CxrError

    names, matrix = _alphabetical(cooc)
    values = np.asarray(matrix)
    fig = Figure(figsize=(11, 9), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(names)), [f"{n} -" for n in names], rotation=90)
    ax.set_yticks(range(len(names)), [f"{n} -" for n in names])
    ax.tick_params(length=0)
    threshold = values.max() / 2
    for i, row in enumerate(values):
        for j, v in enumerate(row):  # dark text on the bright cells, light on the dark ones
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="black" if v > threshold else "white")
    fig.colorbar(image, ax=ax, label="Co-occurrences for each disease (#)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise CxrError(f"{path}: cannot write the heatmap ({e.strerror}); choose a writable path") from None
