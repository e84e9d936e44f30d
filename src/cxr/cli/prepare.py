"""`cxr prepare` (decode films once into a cache) and `cxr augment-preview` (see the training augmentations)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from cxr.cli import _options as opt
from cxr.errors import CxrError

_SHOWN_FAILURES = 20  # the rest are in failed.json


def prepare(
    images_dir: Annotated[Path, typer.Argument(help="Folder of PNG/JPEG/DICOM films (subfolders included).")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder to create or extend.")],
    size: Annotated[int, typer.Option(help="Side of the stored square films, in pixels.")] = 256,
    workers: int | None = opt.workers(),
    progress: bool = opt.progress(),
) -> None:
    """Decode every film once, resize it and store it in one memory-mapped file; re-running adds only new films."""
    from rich.console import Console

    from cxr.data.cache import prepare as run_prepare

    report = run_prepare(images_dir, out, size=size, workers=workers, progress=progress)
    console = Console()
    console.print(
        f"[bold]{report.out_dir}[/bold]: {report.total} films at {report.size} px  "
        f"([green]prepared {report.prepared}[/green], skipped {report.skipped} already cached, "
        f"[{'red' if report.failed else 'green'}]failed {len(report.failed)}[/], "
        f"ignored {len(report.ignored)} non-film files) in {report.seconds:.1f} s"
    )
    for f in report.failed[:_SHOWN_FAILURES]:
        console.print(f"  [red]failed[/red] {f['name']}: {f['reason']}", highlight=False)
    if len(report.failed) > _SHOWN_FAILURES:
        more = len(report.failed) - _SHOWN_FAILURES
        console.print(f"  ... and {more} more: see {report.out_dir / 'failed.json'}")


def augment_preview(
    image: Annotated[Path, typer.Argument(help="A film (PNG, JPEG or DICOM).")],
    out: Annotated[Path, typer.Option("--out", help="Figure to write (.png, .pdf, .svg).")],
    n: Annotated[int, typer.Option("--n", min=1, max=64, help="Number of augmented versions.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed draws the same augmentations.")] = 0,
    size: Annotated[int, typer.Option(help="Model input size in pixels.")] = 224,
) -> None:
    """Draw a grid of the film and randomly augmented versions of it, as in the paper's Figure 1."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cxr import images
    from cxr.data import transforms
    gray = images.read_image(image)
    # mean 0, std 1: the grid shows the augmented film in [0, 1], before the model's normalisation
    plain = dict(mean=(0.0,) * 3, std=(1.0,) * 3)
    augment = transforms.train_transform(size, **plain, generator=torch.Generator().manual_seed(seed))
    panels = [(transforms.eval_transform(size, **plain)(gray)[0], "original")]
    for _ in range(n):
        x, p = augment.trace(gray)
        zoom = f"zoom {p['scale']:.2f}" if p["scale"] != 1 else "no zoom"
        light = f"brightness {p['brightness']:.2f}, contrast {p['contrast']:.2f}"
        title = f"rotate {p['angle']:+.0f}°, {zoom}\n{light}"
        panels.append((x[0], title))

    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    if out.suffix.lower().lstrip(".") not in canvas.get_supported_filetypes():
        raise CxrError(f"{out}: cannot write a figure with suffix {out.suffix!r}; use .png, .pdf or .svg")
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if k < len(panels):
            ax.imshow(panels[k][0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(panels[k][1], fontsize=8)
    fig.suptitle(f"{image.name}: training augmentations (seed {seed})")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
    app.command("augment-preview")(augment_preview)
