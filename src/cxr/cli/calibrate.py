"""`cxr calibrate`: refit calibration and operating points on a site's own labelled films (no retraining)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from cxr.cli import _options as opt


class Sparse(str, enum.Enum):
    refuse = "refuse"
    not_assessed = "not-assessed"


def operating_point_option():
    return typer.Option("spec:0.90", "--operating-point",
                        help="How thresholds are chosen per finding: spec:X (specificity at least X; default "
                        "spec:0.90), sens:X (sensitivity at least X) or youden.")


def calibrate(
    model: Optional[Path] = typer.Option(None, "--model", help="A cxr .safetensors checkpoint; default: the bundled model."),
    data: list[Path] = typer.Option(..., "--data", help="A folder of labelled films or a `cxr prepare` cache; repeat to pool several."),
    metadata: Path = typer.Option(..., "--metadata", help="The labels, joined by file name (Data_Entry_2017 format)."),
    out: Path = typer.Option(..., "--out", help="The adapted checkpoint to write (the weights are copied unchanged)."),
    operating_point: str = operating_point_option(),
    sparse: Sparse = typer.Option(Sparse.refuse, "--sparse", help="A finding with too few positive films: refuse "
                                  "(default), or not-assessed (keep it, reported as not assessed)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    workers: int = opt.workers(0, when_unset="0, decoding in this process"),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the AUC intervals that decide 'assessed'."),
) -> None:
    """Refit per-finding calibration (Platt), operating points and the evidence for 'assessed' on your own
    labelled films, and write a copy of the model with them; its weights are not touched."""
    from cxr.evaluation.adapt import calibrate as run
    from cxr.evaluation.calibration import assess

    result = run(None if model is None else str(model), data, metadata, out, policy=operating_point,
                 sparse=sparse.value, batch_size=batch_size, workers=workers, n_boot=n_boot)
    meta, figs = result["meta"], result["calibration"]
    typer.echo(f"{result['summary']['n_images']} films; operating point {meta.policy}")
    typer.echo(f"  {'finding':20} {'AUC (95% CI)':>20} {'Brier skill':>12} {'ECE':>6} {'threshold':>9}  assessed")
    for f, e in meta.assessment.items():
        ok, why = assess(e)
        ci = e.get("auc_ci")
        auc = "n/a" if e.get("auc") is None else f"{e['auc']:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
        fig = figs["per_finding"].get(f, {})
        skill = "n/a" if fig.get("brier_skill") is None else f"{fig['brier_skill']:+.3f}"
        typer.echo(f"  {f:20} {auc:>20} {skill:>12} {fig.get('ece', float('nan')):6.3f} "
                   f"{meta.thresholds.get(f, float('nan')):9.3f}  {'yes' if ok else 'no: ' + why}")
    for note in result["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
