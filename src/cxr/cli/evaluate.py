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
    update_model: Optional[Path] = typer.Option(
        None, "--update-model", help="Write a copy of the model to this path whose assessment evidence and "
        "thresholds (by --operating-point) come from this evaluation; its weights are copied unchanged."),
    operating_point: Optional[str] = typer.Option(
        None, "--operating-point", help="With --update-model: spec:X | sens:X | youden; default: the model's "
        "own policy, else spec:0.90."),
    calibrate: bool = typer.Option(False, "--calibrate", help="With --update-model: refit Platt calibration too."),
    stability: bool = typer.Option(
        False, "--stability", help="Also score each film as a phone would capture it (JPEG 70, tilt, glare, "
        "crop, exposure, light-box photo): mean and max |dp|, AUC and acceptance per variant, in report.json. "
        "Seven reads a film."),
) -> None:
    """Evaluate a model: AUC and AP per finding with 95% CIs, F1 variants, the paper's Figs 7, 9-12, 21;
    calibration (Brier, Brier skill, ECE, reliability diagram) and flagged findings per film."""
    from rich.progress import Progress

    from cxr.evaluation.evaluate import evaluate as run

    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("scoring films", total=None)
        summary = run(
            None if model is None else str(model), data, metadata, out, split, subset=subset.value, seed=seed,
            task=task, compare=None if compare is None else str(compare), lists=lists, batch_size=batch_size,
            workers=workers, n_boot=n_boot, device=device, precision=precision.value,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
            update_model=update_model, operating_point=operating_point, calibrate=calibrate,
        )
    show(summary)
    if stability:
        from cxr.evaluation import stability as capture_noise

        with Progress(transient=True, disable=not progress) as bar:
            job = bar.add_task("capture variants", total=None)
            result = capture_noise.stability(
                None if model is None else str(model), data, out, seed=seed or 0, batch_size=batch_size,
                device=device, precision=precision.value,
                progress=lambda done, total: bar.update(job, completed=done, total=total))
        for line in capture_noise.lines(result):
            typer.echo(line)
    typer.echo(f"wrote {out / 'report.html'}")


def show(summary: dict) -> None:
    """The headline numbers and notes, on the terminal."""
    def fmt(x, ci=None) -> str:
        return "n/a" if x is None else f"{x:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    typer.echo(f"{summary['n_images']} films, task {summary['task']}")
    for key in ("macro_auc", "micro_auc", "macro_ap", "micro_ap"):
        typer.echo(f"  {key.replace('_', ' ').upper():10} {fmt(summary[key], summary.get(key + '_ci'))}")
    overall = (summary.get("calibration") or {}).get("overall")
    if overall:
        skill = "n/a" if overall["brier_skill"] is None else f"{overall['brier_skill']:+.3f}"
        typer.echo(f"  BRIER      {overall['brier']:.4f} (skill vs the base rates {skill}), ECE {overall['ece']:.3f}")
    flags = summary.get("flags")
    if flags and flags["flagged_per_film"] is not None:
        typer.echo(f"  FLAGS      {flags['flagged_per_film']:.2f} flagged findings per film "
                   f"(true: {flags['true_per_film']:.2f}); not assessed: {', '.join(flags['not_assessed']) or 'none'}")
    if summary.get("updated_model"):
        typer.echo(f"wrote {summary['updated_model']['path']} (operating point {summary['updated_model']['policy']})")
    for note in summary.get("notes", []):
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.secho("Not for clinical use.", bold=True)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
