"""The networks: a registry of architectures (bodies), the paper's head, and safetensors checkpoints."""

from __future__ import annotations

import importlib
import pkgutil

import torch

from cxr.errors import ModelError
from cxr.meta import ModelMeta
from cxr.nets.checkpoint import load, load_extra, load_model, resolve_model, save
from cxr.nets.ensemble import Ensemble, ensemble
from cxr.nets.head import AdaptiveConcatPool2d, CxrNet, freeze_body
from cxr.nets.registry import ARCHITECTURES, build, default_normalisation, get_architecture, register, unregister
from cxr.tasks import Task, get_task

# Every other module in this package is an architecture that registers itself on import: adding one is
# adding its file. (The infrastructure modules are imported above.)
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_mod.name}")

TWO_CLASS_OUTPUTS = list(get_task("pneumothorax").outputs)  # older callers' name for the 2-class outputs

__all__ = ["ARCHITECTURES", "activate", "AdaptiveConcatPool2d", "CxrNet", "Ensemble", "ModelMeta", "TWO_CLASS_OUTPUTS", "build",
           "default_normalisation", "ensemble", "freeze_body", "get_architecture", "load", "load_extra", "load_model",
           "resolve_model",
           "probabilities", "register", "save", "unregister"]


def __getattr__(name: str):
    if name == "ARCHS":  # the registered names now, not a copy taken at import
        return tuple(ARCHITECTURES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def activate(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """float32 probabilities under the task's activation: sigmoids per output, or a softmax over classes."""
    logits = torch.as_tensor(logits).float()
    return logits.softmax(-1) if task.softmax else logits.sigmoid()


def probabilities(logits: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """Per-output probabilities as the task defines them (cxr.tasks.probabilities): independent sigmoids
    for findings (never renormalised to sum to 1), a softmax over exclusive classes. Always float32."""
    logits = torch.as_tensor(logits).float()
    if logits.shape[-1] != len(meta.outputs):
        raise ModelError(f"{logits.shape[-1]} logits for a model with {len(meta.outputs)} outputs")
    return activate(logits, get_task(meta.task))
