"""A model's ONNX artefacts, and the torch-free runtime that reads them (onnxruntime + numpy + safetensors).

Layout: a checkpoint `NAME.safetensors` carries two companion files beside it, written by `cxr export`
(cxr.inference.export.export_artefacts, which needs torch):

    NAME.safetensors        the checkpoint: tensors, ModelMeta JSON in its header, the gate's extra tensors
    NAME.runtime.onnx       one graph: "image" (N x 3 x S x S, preprocessed as pipeline.preprocess does) ->
                            "logits" (N x outputs), "features" (N x C, the gate's mean-pooled features),
                            "cams" (N x outputs x h x w, Grad-CAM of every output before normalisation; see
                            cxr.inference.camgraph) and, for a calibrated model only, "probabilities"
    NAME.runtime.json       the manifest: format, the checkpoint's size and sha256, the graph's sha256, the
                            versions that wrote it and the parity measured against torch at export

One graph rather than three: the body runs once for the probabilities, the gate and the heatmaps, and its
weights are held in memory once. Artefacts are fresh when the manifest's format is this cxr's and both
checksums match the files; a checkpoint changed after export (a new gate, calibration) makes them stale,
and the runtime then refuses them (`stale_reason` says why) rather than run an older model.

Nothing here imports torch: `cxr predict` and `cxr serve` can run on a machine without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.errors import ModelError
from cxr.meta import ModelMeta

FORMAT = 1  # bump when the graph's inputs, outputs or their meaning change
GRAPH_SUFFIX, MANIFEST_SUFFIX = ".runtime.onnx", ".runtime.json"
INPUT, OUTPUTS, PROBABILITIES = "image", ("logits", "features", "cams"), "probabilities"
EXTRA = "extra."  # the checkpoint's prefix for tensors beside the network (cxr.nets.checkpoint.EXTRA)


class ArtefactError(ModelError):
    """A model's ONNX artefacts are missing, stale or unreadable."""


@dataclass(frozen=True)
class Paths:
    checkpoint: Path
    graph: Path
    manifest: Path


def paths(checkpoint: str | os.PathLike) -> Paths:
    """Where the artefacts of a checkpoint live: beside it, named after it."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.name[:-len(checkpoint.suffix)] if checkpoint.suffix else checkpoint.name
    return Paths(checkpoint, checkpoint.with_name(stem + GRAPH_SUFFIX), checkpoint.with_name(stem + MANIFEST_SUFFIX))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(checkpoint: str | os.PathLike) -> dict:
    where = paths(checkpoint).manifest
    try:
        data = json.loads(where.read_text())
    except FileNotFoundError:
        raise ArtefactError(f"{where} does not exist: run `cxr export --model {checkpoint}` to write the "
                            "model's ONNX artefacts") from None
    except (OSError, ValueError) as e:
        raise ArtefactError(f"{where} is not a readable manifest ({e}); run `cxr export --model {checkpoint}` "
                            "again") from None
    if not isinstance(data, dict):
        raise ArtefactError(f"{where} is not a cxr artefact manifest; run `cxr export --model {checkpoint}` again")
    return data


def stale_reason(checkpoint: str | os.PathLike) -> str | None:
    """None when the checkpoint has fresh artefacts; else what is wrong, and what to run."""
    p = paths(checkpoint)
    redo = f"run `cxr export --model {p.checkpoint}`"
    if not p.checkpoint.is_file():
        return f"checkpoint {p.checkpoint} does not exist"
    try:
        manifest = read_manifest(p.checkpoint)
    except ArtefactError as e:
        return str(e)
    if manifest.get("format") != FORMAT:
        return f"{p.manifest} has artefact format {manifest.get('format')!r}, this cxr reads {FORMAT}: {redo}"
    source = manifest.get("checkpoint", {})
    if source.get("bytes") != p.checkpoint.stat().st_size or source.get("sha256") != sha256(p.checkpoint):
        return f"{p.checkpoint} changed after its ONNX artefacts were written (stale {p.graph.name}): {redo}"
    if not p.graph.is_file() or manifest.get("graph", {}).get("sha256") != sha256(p.graph):
        return f"{p.graph} is missing or does not match {p.manifest.name}: {redo}"
    return None


BUNDLED_NAME = "bundled"  # what `cxr models` lists the bundled model as


def resolve_model(spec: str | os.PathLike | None = None) -> Path:
    """The checkpoint file --model means, for every command: None or "bundled" -> the bundled model; an
    existing file -> itself; a bare name -> NAME.safetensors in the models folder (`cxr models` lists them).
    Here rather than in cxr.nets (which re-exports it) so that the torch-free runtime can resolve names."""
    from cxr import settings as config

    if spec is None or str(spec) in (BUNDLED_NAME, config.BUNDLED_MODEL.stem):
        if not config.BUNDLED_MODEL.is_file():
            raise ModelError(f"no bundled model in this installation (expected {config.BUNDLED_MODEL}); "
                             "pass a checkpoint with --model PATH, or train one with `cxr train`")
        return config.BUNDLED_MODEL
    path = Path(spec).expanduser()
    if path.exists() or path.parent != Path(".") or path.suffix:
        return path  # a path (a missing one is reported by whoever opens it, naming it)
    named = config.models_dir() / f"{path.name}.safetensors"
    if named.is_file():
        return named
    raise ModelError(f"--model {spec}: no such file, and no model named {path.name!r} in {config.models_dir()} "
                     "(`cxr models` lists the names; `cxr import` adds models there)")


def has_fresh_artefacts(checkpoint: str | os.PathLike) -> bool:
    return stale_reason(checkpoint) is None


def read_checkpoint_header(checkpoint: str | os.PathLike) -> tuple[ModelMeta, dict[str, np.ndarray]]:
    """(ModelMeta, the extra tensors by name without their prefix, as numpy) read without torch."""
    from safetensors import safe_open

    path = Path(checkpoint)
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            extra = {k[len(EXTRA):]: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA)}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ModelError(f"{path} is not a readable .safetensors checkpoint ({e})") from None
    if "cxr" not in header:
        raise ModelError(f"{path} is a safetensors file but not a cxr checkpoint (no 'cxr' metadata in its header)")
    return ModelMeta.from_json(header["cxr"]), extra


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map (last two dims) divided by its max: float32 in [0, 1]; all-zero maps stay zero (as
    cxr.explain.gradcam.normalise)."""
    maps = np.asarray(maps, dtype=np.float32)
    if not np.isfinite(maps).all():
        raise ArtefactError("the heatmap holds NaN or infinite values: the model's outputs overflow on this film")
    peak = maps.max(axis=(-2, -1), keepdims=True)
    out = np.zeros_like(maps)
    np.divide(maps, np.maximum(peak, np.finfo(np.float32).tiny), out=out, where=peak > 0)
    return out


class Runtime:
    """A checkpoint run through its ONNX artefacts on the CPU, without torch.

    `.meta` (ModelMeta) and `.extra` (the gate's statistics, numpy) come from the checkpoint itself;
    threads None = ONNX Runtime's default (one per physical core). Raises ArtefactError when the
    artefacts are missing or stale (check: False skips the checksums, for a caller that just checked)."""

    def __init__(self, checkpoint: str | os.PathLike, *, threads: int | None = None, check: bool = True):
        import onnxruntime as ort

        self.paths = paths(checkpoint)
        if check and (why := stale_reason(checkpoint)) is not None:
            raise ArtefactError(why)
        self.meta, self.extra = read_checkpoint_header(checkpoint)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        # Idle ORT threads spin-wait by default: they would take the cores the decoding threads need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Pre-packing keeps a second, re-laid-out copy of the weights: for the bundled 3-network ensemble
        # (73 MB of graph) that was 22 MB of peak memory for 3-4% of speed (docs/BENCHMARKS.md, runtime).
        opts.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self.session = ort.InferenceSession(str(self.paths.graph), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for damaged or foreign files
            raise ArtefactError(f"{self.paths.graph}: ONNX Runtime cannot load it ({e}); run "
                                f"`cxr export --model {checkpoint}` again") from None
        names = [o.name for o in self.session.get_outputs()]
        if names[:3] != list(OUTPUTS):
            raise ArtefactError(f"{self.paths.graph} gives {names}, not {list(OUTPUTS)}: not a cxr runtime graph")
        self.calibrated = PROBABILITIES in names

    @property
    def num_features(self) -> int:
        return int(self.session.get_outputs()[1].shape[1])

    def _run(self, outputs: list[str], x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits N x outputs, pooled features N x C) for a preprocessed batch N x 3 x S x S."""
        logits, feats = self._run(list(OUTPUTS[:2]), x)
        return logits, feats

    def classify_with_cams(self, x: np.ndarray, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, pooled features, Grad-CAM maps N x K x h x w normalised to max 1) from one pass; targets
        are output indices (cxr.explain.gradcam.target_indices gives them for finding names)."""
        targets = [int(t) for t in targets]
        n = len(self.meta.outputs)
        if not targets or any(not 0 <= t < n for t in targets):
            raise ArtefactError(f"targets must be output indices in 0..{n - 1}, got {targets}")
        logits, feats, cams = self._run(list(OUTPUTS), x)
        return logits, feats, normalise(cams[:, targets])

    def cams(self, x: np.ndarray, targets) -> np.ndarray:
        """Grad-CAM maps N x K x h x w (feature-map resolution, each normalised to max 1)."""
        return self.classify_with_cams(x, targets)[2]


class RuntimeEngine:
    """A checkpoint's ONNX artefacts (Runtime) behind the engine interface of torchpath.TorchEngine."""

    model = None

    def __init__(self, rt: Runtime):
        self.runtime, self.num_features = rt, rt.num_features

    def run(self, x: np.ndarray, *, precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.runtime.classify(x)  # fp32 always: the Runtime is only chosen for fp32

    def with_maps(self, x: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.runtime.classify_with_cams(x, targets)
