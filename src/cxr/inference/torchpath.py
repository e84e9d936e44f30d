"""The Predictor's torch engine: what needs torch (bf16, CUDA, a model without fresh ONNX artefacts).

The Predictor imports this module only when it has to, so `cxr predict` and `cxr serve` on a model with
its artefacts never import torch (cxr.inference.artefacts.Runtime does the work there). An engine maps
a preprocessed batch to (logits, pooled features) and, with heatmaps, also Grad-CAM maps normalised to
max 1 at feature-map resolution, as numpy, the same contract as the Runtime's.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from cxr import nets as M
from cxr.inference.backends import make_backend, pooled


def load(path: Path):
    """(net, meta) of a checkpoint file."""
    return M.load_model(path)


class TorchEngine:
    """A loaded network behind one backend ('onnx' through a torch export, or 'torch')."""

    def __init__(self, net: torch.nn.Module, meta, *, backend: str, path: Path | None, threads: int | None,
                 precision: str, device: str):
        if threads:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-model thread count
        self.model, self.meta = net, meta
        self.num_features = int(net.body.num_features)
        self.run = make_backend(backend, net, meta, path=path, threads=threads, precision=precision, device=device)
        self._tap = threading.local()  # the heatmap pass reads the body's feature map for the gate here

    def _capture(self, module, inputs, output) -> None:
        if getattr(self._tap, "on", False):
            self._tap.fmap = output.detach()

    def with_maps(self, x: np.ndarray, targets: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, pooled features, Grad-CAM maps N x K x h x w in [0, 1]) from one pass through the body."""
        from cxr.explain import gradcam as explain

        device = next(self.model.parameters()).device
        hook = self.model.body.register_forward_hook(self._capture)  # per call: no hooks left on the model
        self._tap.on = True
        try:
            logits, cams = explain.gradcam(self.model, torch.from_numpy(x).to(device), targets, meta=self.meta)
            fmap = self._tap.fmap
        finally:
            self._tap.on, self._tap.fmap = False, None
            hook.remove()
        return logits.float().cpu().numpy(), pooled(fmap).cpu().numpy(), cams.cpu().numpy()
