"""`cxr models`: the bundled model and the models in the models folder, with what each can be trusted for."""

from __future__ import annotations

import json

import typer


def list_models(as_json: bool = typer.Option(False, "--json", help="One JSON object per model.")) -> None:
    """List the models `--model NAME` accepts: name, source, outputs and status (claimed or measured AUC)."""
    from cxr import settings
    from cxr.nets.checkpoint import BUNDLED_NAME

    rows = [describe(BUNDLED_NAME, settings.BUNDLED_MODEL)] if settings.BUNDLED_MODEL.is_file() else []
    folder = settings.models_dir()
    rows += [describe(p.stem, p) for p in sorted(folder.glob("*.safetensors"))] if folder.is_dir() else []
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    typer.echo(f"models folder: {folder} (CXR_MODELS)")
    for r in rows:
        typer.echo(f"{r['name']:<28} {r['source']:<16} {r['outputs']:>2} outputs  {r['status']}")


def describe(name: str, path) -> dict:
    """One row: a model that cannot be read is listed with the reason, not skipped."""
    from cxr.errors import CxrError
    from cxr.nets.checkpoint import read_meta

    try:
        meta = read_meta(path)
    except CxrError as e:
        return {"name": name, "path": str(path), "source": "?", "outputs": 0, "status": f"unreadable: {e}"}
    p = meta.provenance if isinstance(meta.provenance, dict) else {}
    return {"name": name, "path": str(path), "source": p.get("source", "cxr"),
            "outputs": len(meta.outputs) - len(p.get("absent_outputs", [])), "status": status(meta)}


def status(meta) -> str:
    """'measured AUC x' when cxr measured it (metrics or per-finding evidence), else the claim, else none."""
    m = meta.metrics or {}
    auc = m.get("macro_auc", m.get("auc_macro"))
    if auc is None and meta.assessment:
        measured = [v["auc"] for v in meta.assessment.values() if isinstance(v.get("auc"), (int, float))]
        auc = sum(measured) / len(measured) if measured else None
    if isinstance(auc, (int, float)):
        return f"measured macro AUC {auc:.3f}"
    claimed = ((meta.provenance or {}).get("claimed_auc") or {}).get("values") or {}
    if claimed:
        return f"claimed macro AUC {sum(claimed.values()) / len(claimed):.3f} (not measured)"
    return "no AUC recorded"


def register(app: typer.Typer) -> None:
    app.command("models")(list_models)
