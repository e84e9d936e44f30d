"""Backends: a batch of preprocessed films (N x 3 x S x S float32, numpy) -> (logits, pooled features).

Every caller that scores films (the Predictor, hence `cxr predict`, the API, `cxr evaluate` and the gate's
fit) goes through one of these, each held to a stated max abs difference in probability from fp32 eager
torch (TOLERANCE; measured figures in docs/BENCHMARKS.md):

- "onnx": ONNX Runtime fp32 on the exported graph (cxr.inference.export; cached per checkpoint). A
  checkpoint with fresh artefacts skips this module: the Predictor runs cxr.inference.artefacts.Runtime,
  which needs no torch.
- "torch": eager torch, channels_last; fp32 unless bf16 is asked for (cxr.inference.runtime).
- "auto": "onnx" when onnxruntime is installed, else "torch".

`pooled` is the one definition of the gate's features; the exported graph computes the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cxr.errors import CxrError, ModelError
from cxr.inference import runtime
from cxr.inference.runtime import BACKENDS, TOLERANCE, resolve_backend  # noqa: F401 - their old home


def pooled(fmap: torch.Tensor) -> torch.Tensor:
    """The gate's features: the body's feature map averaged over space, float32 B x C."""
    return fmap.float().mean(dim=(2, 3))


@contextlib.contextmanager
def arithmetic(precision: str, device_type: str = "cpu") -> Iterator[None]:
    """Run the enclosed forward pass in `precision` on `device_type`."""
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif device_type == "cuda":
        cudnn = torch.backends.cudnn
        matmul = torch.backends.cuda.matmul
        was = matmul.allow_tf32
        matmul.allow_tf32 = False  # process-wide; restored below (TF32 is off by default for matmuls anyway)
        try:
            with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                             deterministic=cudnn.deterministic, allow_tf32=False):
                yield
        finally:
            matmul.allow_tf32 = was
    else:
        yield


class TorchBackend:
    """Eager torch. The model is moved to `device` and to channels_last in place (same numbers, faster on
    CPU) and put in eval mode."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, *, precision: str = runtime.DEFAULT_PRECISION,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.precision = runtime.check_precision(precision, "torch")
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    def __call__(self, x: np.ndarray, *, precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), arithmetic(precision or self.precision, self.device.type):
            fmap = self.model.features(t.contiguous(memory_format=torch.channels_last))
            logits = self.model.classify(fmap)
        return logits.float().cpu().numpy(), pooled(fmap).cpu().numpy()


class OnnxBackend:
    """ONNX Runtime fp32 on the CPU."""

    name = "onnx"
    precision = "fp32"

    def __init__(self, data: bytes, threads: int | None = None):
        from cxr.inference import export
        self.session, self.input, self.outputs = export.session(data, threads), export.INPUT, list(export.OUTPUTS)

    def __call__(self, x: np.ndarray, *, precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self.session.run(self.outputs, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        return logits, feats


def make_backend(name: str, model: torch.nn.Module, meta, *, path: Path | None = None, threads: int | None = None,
                 precision: str = runtime.DEFAULT_PRECISION, device: str | torch.device = "cpu"):
    """The backend `name` ('onnx' or 'torch', resolved) for a loaded model. ONNX exports are cached per
    checkpoint file when there is one (`path`), else exported now."""
    runtime.check_precision(precision, name)
    if name == "torch":
        return TorchBackend(model, precision=precision, device=device)
    if torch.device(device).type != "cpu":
        raise CxrError(f"the onnx backend runs on the CPU, not {device}; use backend 'torch' for {device}")
    from cxr.inference import export
    if path is None:
        return OnnxBackend(export.to_onnx(model, meta), threads)
    try:
        return OnnxBackend(export.cached_onnx(path, model, meta), threads)
    except Exception:  # noqa: BLE001 - a damaged cache file: export afresh once before giving up
        try:
            return OnnxBackend(export.cached_onnx(path, model, meta, refresh=True), threads)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{path}: cannot run with ONNX Runtime ({e}); try backend='torch'") from None
