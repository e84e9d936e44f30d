"""ONNX export: the model as one .onnx file for ONNX Runtime (and the Predictor's fast CPU backend).

The graph takes "image" (N x 3 x S x S float32, normalised as `transforms.preprocess` does; N dynamic) and
gives "logits" (N x outputs) and "features" (N x C, the mean-pooled feature map the gate reads). The
checkpoint's `ModelMeta` JSON is stored in the model's metadata_props under "cxr", so the file says how to
preprocess its input and read its outputs. Tests hold ORT's probabilities to 1e-4 of torch fp32
(backends.TOLERANCE; measured differences in docs/BENCHMARKS.md).

The TorchScript exporter is used (dynamo=False): it exports several times faster than torch.export, and
the Predictor exports at load when its cache is cold. It falls back to torch.export if a later torch
removes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr import settings as config
from cxr.errors import CxrError
from cxr.inference import artefacts

INPUT, OUTPUTS = "image", ("logits", "features")
META_KEY = "cxr"
OPSET = 17
FORMATS = ("onnx",)
_CACHE_VERSION = "2"  # bump when the exported graph changes, so stale cached files are not reused
CACHE_KEEP = 8


class ExportError(CxrError):
    """The model cannot be exported or the exported file cannot be read."""


class Exported(nn.Module):
    """model -> (logits, mean-pooled features): one forward pass for the findings and the gate."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from cxr.inference.backends import pooled

        fmap = self.model.features(x)
        return self.model.classify(fmap), pooled(fmap)


def to_onnx(model: nn.Module, meta) -> bytes:
    """The serialized ONNX model (fp32, dynamic batch) with meta's JSON in its metadata_props."""
    import onnx

    wrapper = Exported(model).eval()
    example = torch.zeros(1, 3, meta.input_size, meta.input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation and its constant-folding limits on every call.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, (example,), buf, input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUTS[0]: {0: "batch"}, OUTPUTS[1]: {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        except (TypeError, RuntimeError, NotImplementedError):
            buf = io.BytesIO()
            torch.onnx.export(wrapper, (example,), buf, input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True)
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    proto.doc_string = f"cxr {meta.arch} ({meta.task}): outputs {', '.join(meta.outputs)}. Not for clinical use."
    return proto.SerializeToString()


def export(model_spec: str | os.PathLike | None, out: str | os.PathLike, fmt: str = "onnx") -> Path:
    """Load a checkpoint (None = bundled) and write it as `fmt` to `out`, atomically."""
    from cxr import nets as M
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    net, meta = M.load_model(model_spec)
    return _write_atomic(Path(out), to_onnx(net, meta))


# ------------------------------------------------------------------------------- runtime artefacts

CAM_TOLERANCE, CAM_MIN_CORRELATION = 1e-3, 0.999  # per normalised map, against autograd Grad-CAM
CHECK_FILMS = 4  # synthetic films the graph is checked on when no real ones are given


def export_artefacts(model_spec: str | os.PathLike | None, films=None) -> artefacts.Paths:
    """Write a checkpoint's runtime artefacts beside it (see cxr.inference.artefacts for the layout), after
    checking the graph against torch on `films` (gray arrays; default: CHECK_FILMS synthetic ones).
    None = the bundled model. Raises ExportError, writing nothing, when the check fails."""
    import cxr
    import onnx
    import onnxruntime

    from cxr import nets as M
    from cxr.inference import camgraph

    source = M.resolve_model(model_spec)
    net, meta = M.load_model(source)
    data = camgraph.to_onnx(net, meta, OPSET)
    parity = check_artefact(net, meta, data, films)
    where = artefacts.paths(source)
    manifest = {
        "format": artefacts.FORMAT,
        "checkpoint": {"name": source.name, "bytes": source.stat().st_size, "sha256": artefacts.sha256(source)},
        "graph": {"name": where.graph.name, "sha256": hashlib.sha256(data).hexdigest(),
                  "input": [None, 3, meta.input_size, meta.input_size],
                  "outputs": camgraph.output_names(getattr(meta, "platt", None) is not None
                                                   and meta.activation == "sigmoid")},
        "versions": {"cxr": cxr.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "opset": OPSET},
        "parity": parity,
    }
    try:
        _write_atomic(where.graph, data)
        _write_atomic(where.manifest, (json.dumps(manifest, indent=1) + "\n").encode())  # last: the commit point
    except OSError as e:
        raise ExportError(f"cannot write the artefacts beside {source} ({e}): copy the checkpoint somewhere "
                          "writable and export that copy") from None
    return where


def _check_batch(meta, films) -> torch.Tensor:
    """Preprocessed films to check on: the given gray films, else smooth seeded random fields (a film's
    large-scale structure, so the maps are not noise)."""
    import torch.nn.functional as F

    from cxr.inference.pipeline import preprocess

    if films is None:
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(CHECK_FILMS, 1, 9, 9, generator=g, dtype=torch.float64)
        films = F.interpolate(coarse, size=(256, 256), mode="bicubic", align_corners=False).clamp(0, 1)
        films = [f[0].float().numpy() for f in films]
    return torch.from_numpy(np.stack([preprocess(np.asarray(f, np.float32), meta) for f in films]))


def check_artefact(net: nn.Module, meta, data: bytes, films=None) -> dict:
    """The runtime graph's largest differences from torch (probabilities, gate features, normalised Grad-CAM
    maps and their lowest correlation); ExportError when one is over its tolerance."""
    from cxr.explain import gradcam
    from cxr.inference.backends import TOLERANCE
    from cxr.tasks import probabilities

    x = _check_batch(meta, films)
    all_outputs = list(range(len(meta.outputs)))
    with torch.no_grad():
        feats = net.eval().features(x).mean(dim=(2, 3)).numpy()
    logits, cams = gradcam.gradcam(net, x, all_outputs, meta=meta)
    got = session(data).run(None, {artefacts.INPUT: x.numpy()})
    want_p = probabilities(logits.numpy(), meta)
    dp = float(np.abs(probabilities(got[0], meta) - want_p).max())
    if len(got) > 3:  # the graph's own calibrated probabilities, for the page
        dp = max(dp, float(np.abs(got[3] - want_p).max()))
    ours, theirs = artefacts.normalise(got[2]), cams.numpy()
    parity = {"films": int(x.shape[0]), "max_abs_probability": dp,
              "max_abs_features": float(np.abs(got[1] - feats).max()),
              "max_abs_cam": float(np.abs(ours - theirs).max()), "min_cam_correlation": _min_correlation(ours, theirs)}
    failed = [f"{k} {parity[k]:.3g} (allowed {limit:g})" for k, limit, bad in (
        ("max_abs_probability", TOLERANCE["onnx"], parity["max_abs_probability"] > TOLERANCE["onnx"]),
        ("max_abs_features", TOLERANCE["onnx"], parity["max_abs_features"] > TOLERANCE["onnx"]),
        ("max_abs_cam", CAM_TOLERANCE, parity["max_abs_cam"] > CAM_TOLERANCE),
        ("min_cam_correlation", CAM_MIN_CORRELATION, parity["min_cam_correlation"] < CAM_MIN_CORRELATION)) if bad]
    if failed:
        raise ExportError(f"the runtime graph of this {meta.arch} model does not match torch: {'; '.join(failed)}. "
                          "Nothing was written; run with the torch backend, and report this with the checkpoint")
    return parity


def _min_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest Pearson correlation between corresponding maps; a pair of identical flat maps counts as 1."""
    a, b = a.reshape(-1, a.shape[-2] * a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-2] * b.shape[-1])
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    corr = np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-300), np.where(np.abs(a - b).max(axis=1) == 0,
                                                                                      1.0, 0.0))
    return float(corr.min())


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_meta(onnx_model: str | os.PathLike | bytes):
    """The ModelMeta stored in an exported file (path or bytes)."""
    import onnx

    from cxr.meta import ModelMeta

    given = isinstance(onnx_model, bytes)
    try:
        proto = onnx.load_from_string(onnx_model) if given else onnx.load(str(onnx_model), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf and onnx raise several types for a damaged file
        raise ExportError(f"{'model' if given else onnx_model}: not a readable ONNX file ({e})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ExportError("this ONNX file was not written by `cxr export` (no 'cxr' metadata)")
    return ModelMeta.from_json(props[META_KEY])


def session(onnx_model: bytes | str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session; threads None = ORT's default (one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    # Idle ORT threads spin-wait by default: they would take the cores the decoding threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$CXR_CACHE, else $XDG_CACHE_HOME/cxr, else ~/.cache/cxr (read by cxr.settings)."""
    return config.cache_dir()


def cached_onnx(checkpoint: Path, model: nn.Module, meta, *, refresh: bool = False) -> bytes:
    """The export of a checkpoint, from the cache when an earlier run made it (keyed by the checkpoint's
    bytes, this torch and this exporter), else (or with refresh) exported now and cached where writable."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{torch.__version__}/{_CACHE_VERSION}/{OPSET}".encode())
    path = cache_dir() / "onnx" / f"{digest.hexdigest()[:32]}.onnx"
    if path.is_file() and not refresh:
        try:
            data = path.read_bytes()
            os.utime(path)  # most recently used: the last to be pruned
            return data
        except OSError:
            pass
    data = to_onnx(model, meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        _prune(path.parent)
    except OSError:
        pass  # a read-only home: export on every start, which is slower but correct
    return data


def _prune(folder: Path) -> None:
    """Keep the CACHE_KEEP most recently used exports: every new checkpoint (each training run, each test's
    random model) adds 20-30 MB, and nothing else ever removes them."""
    files = sorted(folder.glob("*.onnx"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[CACHE_KEEP:]:
        old.unlink(missing_ok=True)
