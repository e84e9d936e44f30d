"""`cxr model-card`: write a checkpoint's model card from its own metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def model_card(
    model: Optional[Path] = typer.Option(None, "--model", help="A cxr .safetensors checkpoint; default: the bundled model."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file to write; default: print it."),
    title: Optional[str] = typer.Option(None, help="Title of the card (default: from the checkpoint)."),
) -> None:
    """Model card: data, split, validation metrics with 95% CIs, intended use, not for clinical use."""
    from cxr.evaluation import modelcard
    from cxr.nets import load_model

    _, meta = load_model(model)
    text = modelcard.render(meta, title=title)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("model-card")(model_card)
