"""`cxr evaluate`: score a model on labelled films and write report.json, figures, tables and report.html."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from cxr.cli import _options as opt


class Subset(str, enum.Enum):
    val = "val"
    test = "test"
    all = "all"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", help="A cxr .safetensors checkpoint; default: the bundled model."),
    data: list[Path] = typer.Option(..., "--data", help="A folder of films (any resolution) or a `cxr prepare` cache; repeat to pool several, as `cxr train` does."),
    metadata: Path = typer.Option(..., "--metadata", help="Data_Entry_2017[_v2020].csv[.gz]: labels joined by file name."),
    out: Path = typer.Option(..., "--out", help="Folder for report.html, report.json, figures, tables, scores.csv."),
    split: Optional[str] = typer.Option(
        None, "--split", help="patient | official | random (re-made as `cxr train` makes it on these films), "
        "a training run's split.json (exact), or model (the names the checkpoint records, e.g. the bundled model's); default: every labelled film."),
    subset: Subset = typer.Option(Subset.val, "--subset", help="Which part of --split to evaluate."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of --split; default: the model's training seed."),
    task: Optional[str] = typer.Option(
        None, "--task", help="multilabel (all films) | multilabel-paper (films with a finding); default: the model's."),
    compare: Optional[Path] = typer.Option(
        None, "--compare", help="A second checkpoint scored on the same films: Fig. 21 (e.g. unweighted vs weighted loss)."),
    lists: Optional[Path] = typer.Option(None, "--lists", help="NIH's split lists for --split official; default: beside --metadata."),
    batch_size: int = typer.Option(32, "--batch-size"),
    workers: int = opt.workers(0, when_unset="0, decoding in this process"),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the 95% intervals."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (torch backend); default: cpu, as `cxr predict` runs."),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="Inference arithmetic: fp32 (default) or bf16 (opt-in, torch backend; its measured max |dp| against fp32 is printed)."),
    progress: bool = opt.progress(),
) -> None:
    """Evaluate a model: AUC and AP per finding with 95% CIs, F1 variants, the paper's Figs 7, 9-12, 21."""
    from rich.progress import Progress

    from cxr.evaluation.evaluate import evaluate as run

    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("scoring films", total=None)
        summary = run(
            None if model is None else str(model), data, metadata, out, split, subset=subset.value, seed=seed,
            task=task, compare=None if compare is None else str(compare), lists=lists, batch_size=batch_size,
            workers=workers, n_boot=n_boot, device=device, precision=precision.value,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    show(summary)
    typer.echo(f"wrote {out / 'report.html'}")


def show(summary: dict) -> None:
    """The headline numbers and notes, on the terminal."""
    def fmt(x, ci=None) -> str:
        return "n/a" if x is None else f"{x:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    typer.echo(f"{summary['n_images']} films, task {summary['task']}")
    for key in ("macro_auc", "micro_auc", "macro_ap", "micro_ap"):
        typer.echo(f"  {key.replace('_', ' ').upper():10} {fmt(summary[key], summary.get(key + '_ci'))}")
    for note in summary.get("notes", []):
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.secho("Not for clinical use.", bold=True)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
