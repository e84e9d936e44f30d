"""The precision policy: which arithmetic inference runs in, so that reported numbers never depend on the CPU.

- fp32 is the default everywhere numbers are reported (`cxr predict`, the API, `cxr evaluate`). On a GPU
  "fp32" means true fp32: TF32 convolutions are switched off for the pass.
- bf16 is opt-in only (`Predictor(precision="bf16")`, `cxr evaluate --precision bf16`), torch backend
  only, and never chosen from the hardware. Its cost in accuracy is measured, not assumed: the first
  batch_size films a Predictor scores are also computed in fp32 and the max |dp| between the two is
  recorded (`Measured`) and printed by `cxr evaluate`.

Why not "bf16 where the CPU computes it natively", as evaluation once did: the same model then gave
different numbers on different machines, and a reproducibility test of the model card failed on CPUs with
AVX512-BF16. See docs/BENCHMARKS.md for the measured speed and error of bf16 on this project's models.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.errors import CxrError

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"
BACKENDS = ("auto", "onnx", "torch")
TOLERANCE = {"onnx": 1e-4, "torch": 1e-4}  # max abs diff in probability vs fp32 eager torch


def resolve_backend(backend: str) -> str:
    """"auto" -> "onnx" when onnxruntime is installed, else "torch"; the others as given (checked)."""
    if backend not in BACKENDS:
        raise CxrError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    return backend


def check_precision(precision: str, backend: str | None = None) -> str:
    """The precision if this backend can run it; a CxrError naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise CxrError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)} "
                       f"(fp32 is the default and what reported numbers use)")
    if precision == "bf16" and backend not in (None, "torch"):
        raise CxrError(f"precision bf16 runs on the torch backend only, not {backend!r}; pass backend='torch' "
                       "(--backend torch) or use fp32")
    return precision


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere (e.g. AVX2-only CPUs)
    PyTorch emulates bf16 and autocast is slower than fp32. Training uses this to pick its precision;
    inference never does (bf16 there is opt-in)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class Measured:
    """The measured cost of a faster precision: max |probability difference| against fp32 on checked films."""

    precision: str
    max_abs_dp: float = 0.0
    films: int = 0

    def add(self, fast: np.ndarray, reference: np.ndarray) -> None:
        if len(fast):
            self.max_abs_dp = max(self.max_abs_dp, float(np.abs(fast - reference).max()))
            self.films += len(fast)

    def __str__(self) -> str:
        if not self.films:
            return f"{self.precision}: no films scored, error not measured"
        return (f"{self.precision}: max |dp| {self.max_abs_dp:.2g} against fp32, measured on {self.films} "
                f"film{'s' if self.films != 1 else ''}")
