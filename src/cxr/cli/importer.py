"""`cxr import SOURCE WHAT`: another project's DenseNet-121 as a cxr checkpoint (safetensors) and its model card.

Sources: torchxrayvision (WHAT = a weights name such as densenet121-res224-nih), chexnet (WHAT = arnoweng's
model.pth.tar), jrzech (WHAT = reproduce-chexnet's pretrained/checkpoint, needs --trust-pickle). The result
goes to --out, by default NAME.safetensors in the models folder, where `cxr models` and `--model NAME` find it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cxr.errors import CxrError

HELP_TRUST = ("Allow unpickling a whole-model file (jrzech). A pickle can run any code when loaded: only for a "
              "file you trust. The output never needs pickle again.")


def import_model(
    source: str = typer.Argument(..., help="torchxrayvision | chexnet | jrzech"),
    what: str = typer.Argument(..., help="torchxrayvision: a weights name (densenet121-res224-nih, -all, -chex, "
                               "-mimic_ch, -rsna, -pc); chexnet/jrzech: the file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint to write (.safetensors); default: "
                                       "NAME.safetensors in the models folder (`cxr models`)."),
    weights_file: Optional[Path] = typer.Option(None, "--weights-file", help="torchxrayvision: its weights file, "
                                                "when it is not in torchxrayvision's cache."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="torchxrayvision: its cache folder "
                                             "(default: its own, ~/.torchxrayvision/models_data)."),
    tta: str = typer.Option("tencrop", "--tta", help="chexnet: tencrop (its test procedure: resize 256, ten "
                            "crops of 224, mean probability) or none (centre crop)."),
    outputs: Optional[str] = typer.Option(None, "--outputs", help="chexnet/jrzech: the classifier's output "
                                          "names in order, comma-separated (default: the 14 ChestX-ray14 findings)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=HELP_TRUST),
) -> None:
    """Import a public DenseNet-121 chest X-ray model (weights never downloaded; see README)."""
    from cxr import settings
    from cxr.nets import imports
    from cxr.nets.imports import chexnet, xrv

    names = [n.strip() for n in outputs.split(",")] if outputs else None
    if source == "torchxrayvision":
        result, name = xrv.convert(what, weights_file=weights_file, cache_dir=cache_dir), what
    elif source == "chexnet":
        result, name = chexnet.convert_chexnet(Path(what), tta=tta, outputs=names), "chexnet"
    elif source == "jrzech":
        result, name = chexnet.convert_jrzech(Path(what), trust_pickle=trust_pickle, outputs=names), "jrzech-chexnet"
    else:
        raise CxrError(f"unknown source {source!r}; expected one of: {', '.join(imports.SOURCES)}")
    path = imports.write(out or settings.models_dir() / f"{name}.safetensors", result)
    card = path.with_suffix(".md")
    card.write_text(render_card(result.meta, name))
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {path} and its card {card}; sha256 of the source file {result.meta.provenance['sha256']}")


def render_card(meta, name: str) -> str:
    """An imported model's card: where it came from, what it is fed, what is only claimed, what it cannot assess."""
    from cxr.evaluation.modelcard import honesty
    from cxr.findings import DISPLAY_NAMES

    p = meta.provenance
    claimed = p.get("claimed_auc") or {}
    values = claimed.get("values") or {}
    lines = [f"# Model card: {name} (imported)", "",
             "**Not for clinical use.** Research software; not a medical device.", "",
             "## Source",
             f"- {p.get('source')} ({p.get('home', '')}); weights {p.get('weights', p.get('file'))}.",
             f"- File `{p.get('file')}`, SHA-256 `{p.get('sha256')}`.", f"- Licence: {p.get('licence')}.",
             "", "## Model",
             f"- DenseNet-121 (torchvision's body), torchvision's classifier (average pool, Linear): "
             f"{len(meta.outputs)} independent sigmoid outputs, never renormalised.",
             f"- Input (`{meta.convention}`): {p.get('input', '')}; test-time augmentation: {meta.tta}.",
             f"- Thresholds: {p.get('thresholds', '0.5 (the source gives none)')}.",
             "", "## Published AUCs: claims, not measured by cxr", f"- Where: {claimed.get('where', 'n/a')}."]
    if values:
        lines += ["", "| Finding | Claimed AUC |", "|---|---:|"]
        lines += [f"| {DISPLAY_NAMES.get(f, f)} | {v:.3f} |" for f, v in values.items()]
        lines.append(f"| macro (mean of the above) | {sum(values.values()) / len(values):.3f} |")
    else:
        lines.append("- None recorded here; see the source.")
    lines.append("- Measure them on your own labelled films: `cxr evaluate --model NAME ...`.")
    if p.get("dropped_outputs"):
        lines.append(f"- Source outputs cxr does not read: {', '.join(p['dropped_outputs'])}.")
    # The thresholds line above says where they came from: not the Youden default honesty() assumes.
    return "\n".join(lines + [x for x in honesty(meta) if not x.startswith("- Operating-point policy")]) + "\n"


def register(app: typer.Typer) -> None:
    app.command("import")(import_model)
