"""Ensembles: K networks of one architecture, read as one model (ModelMeta.members = K).

A cross-validation's fold models, averaged, are one shipped model: each saw (K-1)/K of the films, and
their mean is steadier than any one training run (docs/BENCHMARKS.md measures refit against ensemble).
The ensemble keeps CxrNet's contract, `features` then `classify`, so every consumer works unchanged:

- features(x): the members' feature maps side by side on the channel axis (B x K*C x h x w). Its spatial
  mean is the gate's feature vector, and it is Grad-CAM's target.
- classify(fmap): the mean of the members' logits, each member's head reading its own C channels.

Grad-CAM of the mean logit over that concatenated map is relu(mean_k of member k's pre-ReLU map): the
gradient reaching member k's channels is 1/K of its own. Autograd (cxr.explain) and the closed form of
the runtime graph (cxr.inference.camgraph) both follow from that, with no special case.

Members whose bodies are identical (a body kept frozen at its pretrained weights, only the heads trained)
share one body (ModelMeta.shared_body): stored once, run once. features(x) is then that body's map, every
head reads all of it, and Grad-CAM of the mean logit is relu(mean_k of head k's pre-ReLU map) as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cxr.errors import ModelError
from cxr.nets.head import CxrNet


class StackedBodies(nn.Module):
    """The members' bodies, their feature maps concatenated along channels (member 0's first)."""

    def __init__(self, bodies: Sequence[nn.Module]) -> None:
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.width = int(bodies[0].num_features)
        self.num_features = self.width * len(bodies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([body(x) for body in self.bodies], dim=1)


class AveragedHeads(nn.Module):
    """The members' heads, head k on channels [k*C, (k+1)*C) of the stacked map (or all of a shared body's
    map); the mean of their logits."""

    def __init__(self, heads: Sequence[nn.Module], width: int, shared: bool = False) -> None:
        super().__init__()
        self.heads, self.width, self.shared = nn.ModuleList(heads), int(width), bool(shared)

    def parts(self, fmap: torch.Tensor) -> Sequence[torch.Tensor]:
        """The part of the feature map each head reads, in member order."""
        return [fmap] * len(self.heads) if self.shared else torch.split(fmap, self.width, dim=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        parts = self.parts(fmap)
        return torch.stack([head(part) for head, part in zip(self.heads, parts, strict=True)]).mean(dim=0)


class Ensemble(CxrNet):
    """K CxrNets of one architecture as one CxrNet: body = StackedBodies (or one shared body), head =
    AveragedHeads."""

    def __init__(self, arch: str, num_outputs: int, members: int, head: str = "paper",
                 shared_body: bool = False) -> None:
        nn.Module.__init__(self)  # not CxrNet's: it would build one more body
        if members < 2:
            raise ModelError(f"an ensemble needs at least 2 members, got {members}")
        nets = [CxrNet(arch, num_outputs, head=head) for _ in range(members)]
        self.arch, self.num_outputs, self.head_kind, self.members = arch, num_outputs, head, members
        self.shared_body = bool(shared_body)
        self.body = nets[0].body if shared_body else StackedBodies([n.body for n in nets])
        width = self.body.num_features if shared_body else self.body.width
        self.head = AveragedHeads([n.head for n in nets], width, shared=shared_body)
        self.body_frozen = False


def _same_weights(modules: Sequence[nn.Module]) -> bool:
    first, *rest = (m.state_dict() for m in modules)
    return all(s.keys() == first.keys() and all(torch.equal(s[k], first[k]) for k in s) for s in rest)


def ensemble(models: Sequence[CxrNet]) -> Ensemble:
    """One Ensemble from trained CxrNets of one architecture, head and output count (their weights copied).
    Bodies equal to the bit (trained with the body frozen) become one shared body."""
    if len(models) < 2:
        raise ModelError(f"an ensemble needs at least 2 models, got {len(models)}")
    first = models[0]
    kinds = {(m.arch, m.num_outputs, m.head_kind) for m in models}
    if len(kinds) != 1 or any(isinstance(m, Ensemble) for m in models):
        raise ModelError(f"ensemble members must be single networks of one architecture, head and output count; "
                         f"got {sorted(kinds)}")
    shared = _same_weights([m.body for m in models])
    out = Ensemble(first.arch, first.num_outputs, len(models), head=first.head_kind, shared_body=shared)
    for k, m in enumerate(models):
        (out.body if shared else out.body.bodies[k]).load_state_dict(m.body.state_dict())
        out.head.heads[k].load_state_dict(m.head.state_dict())
    return out.eval()
