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
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from cxr import settings as config
from cxr.errors import CxrError

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
