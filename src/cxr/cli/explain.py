"""`cxr explain`: heatmaps per film and finding, the paper's panels (Figs 8, 13-20), localisation vs boxes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from cxr.cli import _options as opt
from cxr.errors import CxrError

RANDOM_PREFIX = "random:"
STRETCH_PERCENTILE = 99.0  # display only: guided maps are a few bright pixels on black without it


def load_model(spec: str | None):
    """(model, meta): the bundled model (None), a checkpoint path, or random:ARCH (untrained, seed 0)."""
    import torch

    from cxr import nets as M
    from cxr.findings import FINDINGS

    if spec is None or not spec.startswith(RANDOM_PREFIX):
        return M.load_model(spec)
    arch = spec[len(RANDOM_PREFIX):]
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same untrained model every run: sanity checks must be repeatable
        net = M.build(arch, len(FINDINGS), None)
    meta = M.ModelMeta(arch=arch, task="multilabel", outputs=list(FINDINGS), activation="sigmoid",
                       normalisation=M.default_normalisation(arch),
                       provenance={"weights": "random (untrained, seed 0): for sanity checks only"})
    return net, meta


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CxrError(f"{path}: cannot read the evaluation report ({e}); pass report.json from `cxr evaluate`") from None
    if not isinstance(report, dict) or not isinstance(report.get("per_finding"), dict):
        raise CxrError(f"{path}: not a `cxr evaluate` report.json (no 'per_finding' object)")
    return report


def _pr_axes(ax, report: dict, finding: str) -> None:
    """That finding's PR curve from report.json; a report without curve points gives AP and the operating
    point at the model's threshold only, and says so on the axes."""
    from cxr.findings import DISPLAY_NAMES
    from cxr.evaluation.report import iso_f1_axes

    iso_f1_axes(ax)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall", ylabel="Precision")
    ax.set_title(f"{DISPLAY_NAMES.get(finding, finding)}: precision-recall", fontsize=10)
    ax.grid(alpha=0.25)
    entry = report["per_finding"].get(finding)
    if entry is None:
        ax.text(0.5, 0.5, "finding not in the report", ha="center", va="center", color="0.4")
        return
    ap, curve = entry.get("ap"), entry.get("pr_curve")
    label = f"AP = {ap:.2f}" if ap is not None else "AP undefined"
    if curve and curve.get("recall") and curve.get("precision"):
        ax.step(curve["recall"], curve["precision"], where="post", label=label)
    else:
        ax.text(0.05, 0.5, "report.json holds no curve points:\nAP and operating point only", fontsize=8, color="0.35")
        ax.plot([], [], " ", label=label)
    if entry.get("precision") is not None and entry.get("recall") is not None:
        ax.plot(entry["recall"], entry["precision"], "o", color="tab:red",
                label=f"threshold {entry.get('threshold', 0.5):.2f}")
    n_pos, n_neg = entry.get("n_positive"), entry.get("n_negative")
    if n_pos and n_neg is not None:
        ax.axhline(n_pos / (n_pos + n_neg), color="0.6", ls=":", lw=0.8)  # a random reader's precision
    ax.legend(loc="upper right", fontsize=8)


def _display(heatmap: np.ndarray, method: str) -> np.ndarray:
    if method == "gradcam" or not (heatmap > 0).any():
        return heatmap
    top = float(np.percentile(heatmap[heatmap > 0], STRETCH_PERCENTILE))
    return np.clip(heatmap / top, 0.0, 1.0) if top > 0 else heatmap


def write_panel(path: Path, gray: np.ndarray, shown: np.ndarray, title: str, method_label: str,
                report: dict | None, finding: str) -> None:
    """original | heatmap overlay | PR curve (the last only with a report), as in the paper's Figs 13-20."""
    from matplotlib.figure import Figure

    n = 3 if report is not None else 2
    fig = Figure(figsize=(4.2 * n, 4.6))
    axes = fig.subplots(1, n)
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("Original", fontsize=10)
    axes[1].imshow(shown)
    axes[1].set_title(method_label, fontsize=10)
    for ax in axes[:2]:
        ax.set_axis_off()
    if report is not None:
        _pr_axes(axes[2], report, finding)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _write_heatmap(path: Path, heatmap: np.ndarray, fmt: str) -> Path:
    from PIL import Image

    if fmt == "npy":
        path = path.with_suffix(".npy")
        np.save(path, heatmap.astype(np.float32))
    else:  # 16-bit gray PNG: value / 65535 is the heatmap
        Image.fromarray(np.round(np.clip(heatmap, 0, 1) * 65535).astype(np.uint16)).save(path)
    return path


def _film_names(paths: list[Path]) -> list[str]:
    """A folder name per film from its file name, file-system safe and unique."""
    names, seen = [], {}
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem) or "film"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def _labels(metadata: Path | None) -> dict[str, str]:
    if metadata is None:
        return {}
    from cxr.data.nih import read_metadata

    df = read_metadata(metadata)
    return dict(zip(df["image"], df["labels"]))


METHOD_LABELS = {"gradcam": "Grad-CAM", "guided-backprop": "Guided backprop", "guided-gradcam": "Guided Grad-CAM"}


def explain_cmd(
    images: list[Path] = typer.Argument(..., help="Films (PNG, JPEG or DICOM)."),
    out: Path = typer.Option(..., "--out", help="Folder: one subfolder per film, explain.json, localization.json."),
    model: Optional[str] = typer.Option(None, "--model", help="cxr checkpoint (default: the bundled model), or "
                                        "random:densenet121 / random:efficientnet_lite0 for an untrained one."),
    finding: list[str] = typer.Option(["all"], "--finding", help="A finding (repeat for several) or 'all'."),
    method: str = typer.Option("gradcam", "--method", help="gradcam | guided-backprop | guided-gradcam"),
    report: Optional[Path] = typer.Option(None, "--report", help="report.json of `cxr evaluate`: adds the "
                                          "finding's PR curve to each panel."),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="BBox_List_2017.csv: pointing game and IoU "
                                         "against the radiologists' boxes of the films that have them."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="Data_Entry_2017 CSV: NIH labels in titles."),
    heatmap_format: str = typer.Option("png", "--heatmap-format", help="png (16-bit: value/65535) | npy (float32)"),
    alpha: float = typer.Option(0.4, help="Heatmap opacity in the overlays."),
    panels: bool = typer.Option(True, "--panels/--no-panels", help="Draw the panel figures (the slow part)."),
    threads: Optional[int] = opt.threads(),
    progress: bool = opt.progress(),
) -> None:
    """Heatmaps of what the model looked at, per film and finding, at the film's own resolution.

    Writes FINDING-heatmap.png (16-bit), FINDING-overlay.png and FINDING-panel.png (original | heatmap |
    PR curve with --report) per film. Overlays of guided maps are contrast-stretched at the 99th
    percentile for visibility; the heatmap files hold the maps unstretched (max 1). Not for clinical use.
    """
    from cxr.explain import gradcam as E
    if method not in E.METHODS:
        raise CxrError(f"unknown --method {method!r}; expected one of: {', '.join(E.METHODS)}")
    if heatmap_format not in ("png", "npy"):
        raise CxrError(f"unknown --heatmap-format {heatmap_format!r}; expected png or npy")
    if threads:
        import torch

        torch.set_num_threads(threads)  # process-wide, as the Predictor does
    net, meta = load_model(model)
    wanted = "all" if any(f.strip().lower() == "all" for f in finding) else finding
    names = [meta.outputs[t] for t in E.target_indices(meta, wanted)]
    films = _read_films(images)
    context = {"report": _read_report(report) if report else None, "labels": _labels(metadata),
               "boxes": _read_boxes(boxes), "alpha": alpha, "format": heatmap_format, "method": method,
               "panels": panels}
    out.mkdir(parents=True, exist_ok=True)
    summary, records = [], []
    with opt.progress_bar("explaining films", progress and len(films) > 1) as bar:
        task = bar.add_task("explain", total=len(films))
        for path, folder, gray in zip(images, _film_names(images), films):
            item, recs = _explain_one(net, meta, path, out / folder, gray, names, context)
            summary.append(item)
            records.extend(recs)
            bar.advance(task)
    (out / "explain.json").write_text(json.dumps({"method": method, "model": meta.provenance or meta.arch,
                                                  "films": summary}, indent=1))
    typer.echo(f"wrote heatmaps of {len(names)} finding(s) for {len(films)} film(s) to {out}")
    if boxes is not None:
        _report_localisation(out, records, method)


def _read_films(paths: list[Path]) -> list[np.ndarray]:
    from cxr.images import read_image

    return [read_image(p) for p in paths]  # all read first: a bad file fails before any slow work


def _read_boxes(path: Path | None) -> dict:
    if path is None:
        return {}
    from cxr.explain.localize import boxes_by_image
    from cxr.data.nih import read_boxes

    return boxes_by_image(read_boxes(path))


def _explain_one(net, meta, path: Path, folder: Path, gray: np.ndarray, names: list[str], ctx: dict):
    """Heatmaps, overlays and panels of one film; its localisation records."""
    from PIL import Image

    from cxr.explain import gradcam as E
    from cxr.explain import localize
    from cxr.findings import DISPLAY_NAMES
    from cxr.nets import probabilities

    maps, logits = E.explain_films_with_logits(net, meta, [gray], names, ctx["method"])
    probs = dict(zip(meta.outputs, probabilities(logits, meta)[0].tolist()))
    folder.mkdir(parents=True, exist_ok=True)
    labels = ctx["labels"].get(path.name)
    film_boxes = ctx["boxes"].get(path.name, {})
    files, records = {}, []
    for name, heat in maps[0].items():
        stem = E.file_stem(name)
        shown = E.overlay(gray, _display(heat, ctx["method"]), ctx["alpha"])
        Image.fromarray(shown).save(folder / f"{stem}-overlay.png")
        heat_file = _write_heatmap(folder / f"{stem}-heatmap.png", heat, ctx["format"])
        title = f"{path.name}: {DISPLAY_NAMES.get(name, name)} p = {probs[name]:.2f}"
        if labels is not None:
            title += f"   (NIH labels: {labels.replace('|', ', ')})"
        files[name] = {"heatmap": heat_file.name, "overlay": f"{stem}-overlay.png"}
        if ctx["panels"]:
            write_panel(folder / f"{stem}-panel.png", gray, shown, title, METHOD_LABELS[ctx["method"]],
                        ctx["report"], name)
            files[name]["panel"] = f"{stem}-panel.png"
        if name in film_boxes:
            records.append(localize.score(path.name, name, heat, film_boxes[name]))
    item = {"film": str(path), "folder": folder.name, "size": list(gray.shape), "probabilities": probs,
            "files": files}
    if labels is not None:
        item["nih_labels"] = labels
    return item, records


def _report_localisation(out: Path, records: list[dict], method: str) -> None:
    from rich.console import Console

    from cxr.explain import localize
    localize.write_json(out / "localization.json", records, method)
    console = Console()
    if not records:
        console.print("[yellow]none of these films has a radiologist's box for the explained findings; "
                      "localization.json is empty (boxed films: see BBox_List_2017.csv)[/yellow]")
        return
    console.print(localize.table(localize.summarise(records), method))
    console.print(f"wrote {out / 'localization.json'}")


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_cmd)
