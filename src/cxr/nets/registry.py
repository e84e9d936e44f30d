"""The registry of architectures: a name -> how to make its body, its input statistics, its ImageNet weights.

Adding an architecture is one module in this package that defines a body and decorates its factory
with `@register("name")`; `cxr.nets` imports every module here, so nothing else needs to change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cxr import meta as _meta
from cxr.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """body(): a module with `num_features` whose forward gives the feature map (the Grad-CAM target).
    imagenet(body, file or None): loads pretrained weights into a body (None: this arch has none)."""

    name: str
    body: Callable[[], nn.Module]
    normalisation: str = "imagenet"
    imagenet: Callable[[nn.Module, str | os.PathLike | None], None] | None = None


ARCHITECTURES: dict[str, Architecture] = {}


def register(name: str, *, normalisation: str = "imagenet",
             imagenet: Callable[[nn.Module, str | os.PathLike | None], None] | None = None):
    """Decorator for a body factory: `@register("densenet121", imagenet=load)`; returns the factory."""

    def add(body: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        ARCHITECTURES[name] = Architecture(name, body, normalisation, imagenet)
        return body

    return add


def unregister(name: str) -> None:
    ARCHITECTURES.pop(name, None)


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; expected one of: {', '.join(ARCHITECTURES)}") from None


_meta.check_architectures_with(get_architecture)


def default_normalisation(arch: str) -> str:
    """The input statistics the ImageNet weights of `arch` were trained with (a key of NORMALISATIONS)."""
    return get_architecture(arch).normalisation


def build(arch: str = "densenet121", num_outputs: int = 14, weights: str | os.PathLike | None = None,
          dropout: tuple[float, float] = (0.25, 0.5), *, imagenet_file: str | os.PathLike | None = None):
    """A CxrNet in eval mode. weights: None (random), "imagenet" (body only; the head is always fresh),
    or a cxr `.safetensors` checkpoint of the same arch (all of it; its last layer only if the outputs match).

    imagenet_file overrides where the ImageNet file is looked for (each architecture's module says where
    it looks by default).
    """
    from cxr.nets.checkpoint import load_into
    from cxr.nets.head import CxrNet

    model = CxrNet(arch, num_outputs, tuple(dropout))
    if weights is None or str(weights).lower() == "none":
        pass
    elif str(weights) == "imagenet":
        spec = get_architecture(arch)
        if spec.imagenet is None:
            raise ModelError(f"architecture {arch} has no ImageNet weights; use weights=None or a checkpoint")
        spec.imagenet(model.body, imagenet_file)
    else:
        load_into(model, Path(weights))
    return model.eval()
