"""`cxr predict`, `cxr export` and `cxr gate-fit`."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from cxr.cli import _options as opt
from cxr.errors import CxrError

MODEL_HELP = "A cxr checkpoint (.safetensors); default: the bundled model."


# ------------------------------------------------------------------------------------------- inputs


def collect(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, key) for every film named or found (recursively) under a folder, sorted by path.

    path: the folder as typed joined with the path inside it, so two folders holding a.png give two
    names (`film_name` is what the output shows). key: the path relative to the folder it was found in
    (as typed, for a file named directly), in '/' form: what --shard hashes, so shards agree across
    machines that mount the data elsewhere. A named file is always taken (its content decides what it
    is); in folders, films by suffix or DICOM magic, hidden files and folders skipped.
    """
    from cxr.data.films import is_film_file

    found: dict[str, tuple[Path, str]] = {}  # by name: a film typed and also found in its folder is read once
    for root in paths:
        if not root.is_dir():
            found.setdefault(film_name(root), (root, Path(root).as_posix()))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                path = Path(dirpath) / name
                if is_film_file(path):
                    found.setdefault(film_name(path), (path, path.relative_to(root).as_posix()))
    return [found[name] for name in sorted(found)]


def film_name(path: Path) -> str:
    """A film's name in the output: its path as typed (joined with the path inside a folder), '/' form."""
    return Path(path).as_posix()


def missing(paths: list[Path]) -> list[Path]:
    """The paths typed on the command line that name nothing (a broken link included)."""
    return [p for p in paths if not p.exists()]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise CxrError(f"--shard {text!r}: expected i/n, e.g. 0/4 (shards are numbered 0 to n-1)") from None
    if n < 1 or not 0 <= i < n:
        raise CxrError(f"--shard {text!r}: need n >= 1 and 0 <= i < n (shards are numbered 0 to n-1)")
    return i, n


def in_shard(key: str, i: int, n: int) -> bool:
    """Deterministic, machine-independent: the SHA-1 of the key modulo n."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16) % n == i


# ------------------------------------------------------------------------------------------ writers


class _CsvWriter:
    def __init__(self, stream, findings: list[str]):
        import csv

        self.findings, self.w = findings, csv.writer(stream, lineterminator="\n")
        self.w.writerow(["file", "status", "message", *findings, *(f"{f}_positive" for f in findings),
                         *(f"{f}_assessed" for f in findings)])

    def write(self, key: str, pred) -> None:
        probs = [f"{pred.probabilities[f]:.6f}" if pred.probabilities else "" for f in self.findings]
        flags = [str(int(pred.positive[f])) if pred.positive else "" for f in self.findings]
        # 0: the model has no evidence on this finding (never positive); the probability is for research only.
        assessed = [str(int(pred.assessed[f])) if pred.assessed else "" for f in self.findings]
        self.w.writerow([key, pred.status, pred.message, *probs, *flags, *assessed])

    def close(self) -> None:
        pass


class _JsonWriter:
    """A JSON array written one object at a time, so a long run's output survives an interruption up to it."""

    def __init__(self, stream):
        self.stream, self.first = stream, True
        stream.write("[")

    def write(self, key: str, pred) -> None:
        import json

        self.stream.write(("\n" if self.first else ",\n") + json.dumps({"file": key, **pred.to_dict()}))
        self.first = False

    def close(self) -> None:
        self.stream.write("\n]\n")


def _save_heatmaps(folder: Path, key: str, path: Path, pred) -> None:
    """One overlay PNG per finding: FOLDER/<film name without suffix>/<Finding>.png (never outside FOLDER)."""
    from PIL import Image

    from cxr.explain import maps as explain
    from cxr import images
    rel = Path(key).with_suffix("")
    target = folder.joinpath(*(part for part in rel.parts if part not in ("..", ".", rel.anchor)))
    target.mkdir(parents=True, exist_ok=True)
    gray = images.read_image(path)
    for finding, heat in pred.heatmaps.items():
        Image.fromarray(explain.overlay(gray, heat)).save(target / f"{explain.file_stem(finding)}.png")


# ----------------------------------------------------------------------------------------- commands


def predict(
    paths: list[Path] = typer.Argument(..., help="Films (PNG, JPEG, DICOM) and folders of them (searched recursively)."),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    fmt: str = typer.Option("csv", "--format", help="csv | json"),
    out: Optional[Path] = typer.Option(None, "--out", help="File to write (default: standard output)."),
    shard: Optional[str] = typer.Option(None, help="i/n: read only shard i (0-based) of n, e.g. one per machine."),
    batch_size: int = typer.Option(16, help="Films per forward pass."),
    backend: str = typer.Option("auto", help="auto | onnx | torch"),
    threads: Optional[int] = opt.threads(),
    heatmaps: Optional[Path] = typer.Option(None, help="Folder for Grad-CAM overlays, one PNG per film and finding."),
    heatmap_findings: str = typer.Option("all", help="With --heatmaps: 'all' or a comma list of findings."),
    progress: bool = opt.progress(),
    keep_going: bool = typer.Option(False, "--keep-going", help="A typed path that does not exist gives an "
                                    "error row instead of stopping with a usage error (for scripts)."),
) -> None:
    """Read films: one row per film with its status, then each finding's probability and positive flag.

    A film that cannot be read or that the gate refuses gives a row with its reason and no probabilities.
    A path on the command line that does not exist is a usage error (exit 2) unless --keep-going.
    """
    from cxr.inference.predictor import Predictor

    if fmt not in ("csv", "json"):
        raise CxrError(f"--format {fmt!r}: expected csv or json")
    absent = [] if keep_going else missing(paths)
    if absent:
        # Plain text, not click's boxed usage error: the box wraps long paths mid-name, and a user copies them.
        typer.echo(f"Usage error: {', '.join(map(str, absent))}: no such file or folder. Check the path, or pass "
                   "--keep-going to get an error row for each missing path and read the rest.", err=True)
        raise typer.Exit(2)
    films = collect(paths)
    if shard:
        i, n = parse_shard(shard)
        films = [(p, k) for p, k in films if in_shard(k, i, n)]
    if not films:
        raise CxrError("no films found: give PNG, JPEG or DICOM files or folders that hold them")
    predictor = Predictor(model, backend=backend, batch_size=batch_size, threads=threads)
    if not predictor.gate.fitted:
        typer.echo("warning: this model has no fitted gate; only the image checks screen out non-films "
                   "(fit one with `cxr gate-fit`)", err=True)
    wanted = False if heatmaps is None else True if heatmap_findings.strip().lower() == "all" else \
        [f.strip() for f in heatmap_findings.split(",") if f.strip()]
    counts = _run(predictor, films, fmt, out, wanted, heatmaps, progress)
    where = f"; wrote {out}" if out else ""
    typer.echo(f"{len(films)} films: {counts['ok']} read, {counts['refused']} refused by the gate, "
               f"{counts['error']} unreadable{where}", err=True)


def _run(predictor, films, fmt, out, wanted, heatmap_dir, show) -> dict[str, int]:
    counts = {"ok": 0, "refused": 0, "error": 0}
    stream = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115 - closed below
    bar = opt.progress_bar("reading films", show and len(films) > 1)
    try:
        writer = _CsvWriter(stream, predictor.findings) if fmt == "csv" else _JsonWriter(stream)
        with bar:
            task = bar.add_task("predict", total=len(films))
            names = [film_name(p) for p, _ in films]
            preds = predictor.iter_predict([p for p, _ in films], names=names, heatmaps=wanted,
                                           progress=lambda n: bar.advance(task, n))
            for (path, _), name, pred in zip(films, names, preds):
                counts[pred.status] += 1
                if pred.heatmaps:
                    _save_heatmaps(heatmap_dir, name, path, pred)
                writer.write(name, pred)
        writer.close()
    finally:
        if out:
            stream.close()
    return counts


def export_cmd(
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    fmt: str = typer.Option("onnx", "--format", help="onnx"),
    out: Optional[Path] = typer.Option(None, help="Write only the classifier graph ('logits', 'features') to this "
                                       "file, e.g. cxr.onnx. Default: the runtime artefacts beside the checkpoint."),
) -> None:
    """Write the model's ONNX artefacts beside its checkpoint (NAME.runtime.onnx: probabilities, gate features and
    Grad-CAM for every finding in one graph, checked against torch; NAME.runtime.json), so predict and serve run
    without torch. With --out, one classifier graph for other tools instead."""
    from cxr.inference import export
    if out is not None:
        typer.echo(f"wrote {export.export(model, out, fmt)}")
        return
    if fmt not in export.FORMATS:
        raise export.ExportError(f"unknown export format {fmt!r}; expected one of: {', '.join(export.FORMATS)}")
    where = export.export_artefacts(model)
    parity = export.artefacts.read_manifest(where.checkpoint)["parity"]
    typer.echo(f"wrote {where.graph} and {where.manifest} (against torch on {parity['films']} films: probabilities "
               f"within {parity['max_abs_probability']:.1e}, Grad-CAM within {parity['max_abs_cam']:.1e}, "
               f"correlation >= {parity['min_cam_correlation']:.5f})")


def gate_fit(
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    data: list[Path] = typer.Option(..., "--data", help="Folder of real frontal films; repeat for several."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint to write (default: update --model in place)."),
    percentile: float = typer.Option(99.0, help="Percentile of the calibration films' distances ..."),
    margin: float = typer.Option(1.1, help="... times this factor is the threshold."),
    dims: int = typer.Option(64, help="Principal directions whitened (the rest is one residual term)."),
    calibration_fraction: float = typer.Option(0.35, help="Share of films held out of the fit to set the threshold."),
    max_films: int = typer.Option(4000, help="Use at most this many films (a fixed sample by hashed name)."),
    photos: bool = typer.Option(True, "--photos/--no-photos",
                                help="Also fit on a simulated light-box photo of each film (seeded), read as an "
                                     "upload is, so photographed films are not refused."),
    batch_size: int = typer.Option(16),
    backend: str = typer.Option("auto", help="auto | onnx | torch"),
    threads: Optional[int] = opt.threads(),
    progress: bool = opt.progress(),
) -> None:
    """Fit the not-a-chest-X-ray gate on real films and store it in the checkpoint."""
    import dataclasses

    from cxr.inference import gate
    from cxr import nets as M
    from cxr.inference.predictor import Predictor

    source = M.resolve_model(model)
    films = [p for p, _ in collect(data)]
    if not films:
        raise CxrError("no films found under --data: give folders of PNG, JPEG or DICOM frontal films")
    predictor = Predictor(source, backend=backend, batch_size=batch_size, threads=threads)
    if photos:  # import scipy (through the photo maker) here: decode threads importing it at once break it
        from cxr.data import capture as _  # noqa: F401
    with opt.progress_bar("fitting the gate", progress) as bar:
        task = bar.add_task("fit", total=min(len(films), max_films or len(films)))
        gate_meta, tensors = gate.fit(predictor, films, dims=dims, percentile=percentile, margin=margin,
                                      calibration_fraction=calibration_fraction, max_films=max_films,
                                      photo=_light_box_photo if photos else None,
                                      progress=lambda n: bar.advance(task, n))
    net, meta = M.load(source)
    extra = {k: v for k, v in M.load_extra(source).items() if not k.startswith(gate.Stats.PREFIX)}
    target = M.save(out or source, net, dataclasses.replace(meta, gate=gate_meta), extra={**extra, **tensors})
    typer.echo(f"gate fitted on {gate_meta['fit_films']} films, threshold {gate_meta['threshold']:.3f} from "
               f"{gate_meta['calibration_films']} held-out films ({gate_meta['calibration_accepted']:.1%} of them "
               f"accepted; {gate_meta['skipped_films']} skipped); wrote {target}")


def _light_box_photo(gray, index: int):
    """A seeded light-box photo of a film, in gray (seeds apart from `cxr evaluate --stability`'s)."""
    import numpy as np

    from cxr.data import capture as aug
    from cxr.images.capture import to_gray

    return to_gray(aug.light_box_photo(gray, np.random.default_rng(1_000_003 + index))[0])


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("export")(export_cmd)
    app.command("gate-fit")(gate_fit)
