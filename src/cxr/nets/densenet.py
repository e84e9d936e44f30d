"""DenseNet-121 (the paper's network): torchvision's body, with its ImageNet weights read offline."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from cxr import settings as config
from cxr.errors import ModelError
from cxr.nets.checkpoint import load_strict, torch_load_tensors
from cxr.nets.registry import register

DENSENET_FILE = "densenet121-a639ec97.pth"  # torchvision's ImageNet weights, as its hub cache names them


class DenseNetBody(nn.Module):
    """torchvision DenseNet-121 `.features` then ReLU, exactly as torchvision's forward does."""

    num_features = 1024

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import densenet121

        self.features = densenet121(weights=None).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: Grad-CAM hooks read norm5's output too.
        return torch.relu(self.features(x))


def densenet_imagenet_path(explicit: str | os.PathLike | None = None) -> Path:
    """Where DenseNet-121's ImageNet weights are: explicit > $CXR_IMAGENET_WEIGHTS > torch hub cache."""
    given = explicit or config.imagenet_weights()
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ModelError(f"ImageNet weights file {path} does not exist (expected torchvision's {DENSENET_FILE})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / DENSENET_FILE
    if not path.is_file():
        raise ModelError(
            f"DenseNet-121 ImageNet weights not found: cxr never downloads. Copy torchvision's {DENSENET_FILE} "
            f"to {path}, or set CXR_IMAGENET_WEIGHTS to its path (or start from random weights: weights=None)."
        )
    return path


def load_imagenet(body: DenseNetBody, explicit: str | os.PathLike | None) -> None:
    path = densenet_imagenet_path(explicit)
    state = torch_load_tensors(path)
    # torchvision's file predates '.'-free module names: 'norm.1' is now 'norm1' (torchvision does the same).
    old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    state = {(m.group(1) + m.group(2) if (m := old.match(k)) else k): v for k, v in state.items()}
    body_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    load_strict(body.features, body_state, str(path))  # the ImageNet classifier is not used


@register("densenet121", normalisation="imagenet", imagenet=load_imagenet)
def densenet121() -> DenseNetBody:
    return DenseNetBody()
