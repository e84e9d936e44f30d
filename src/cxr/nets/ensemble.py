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
    """The members' heads, head k on channels [k*C, (k+1)*C) of the stacked map; the mean of their logits."""

    def __init__(self, heads: Sequence[nn.Module], width: int) -> None:
        super().__init__()
        self.heads, self.width = nn.ModuleList(heads), int(width)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        parts = torch.split(fmap, self.width, dim=1)
        return torch.stack([head(part) for head, part in zip(self.heads, parts, strict=True)]).mean(dim=0)


class Ensemble(CxrNet):
    """K CxrNets of one architecture as one CxrNet: body = StackedBodies, head = AveragedHeads."""

    def __init__(self, arch: str, num_outputs: int, members: int, head: str = "paper") -> None:
        nn.Module.__init__(self)  # not CxrNet's: it would build one more body
        if members < 2:
            raise ModelError(f"an ensemble needs at least 2 members, got {members}")
        nets = [CxrNet(arch, num_outputs, head=head) for _ in range(members)]
        self.arch, self.num_outputs, self.head_kind, self.members = arch, num_outputs, head, members
        self.body = StackedBodies([n.body for n in nets])
        self.head = AveragedHeads([n.head for n in nets], self.body.width)
        self.body_frozen = False


def ensemble(models: Sequence[CxrNet]) -> Ensemble:
    """One Ensemble from trained CxrNets of one architecture, head and output count (their weights copied)."""
    if len(models) < 2:
        raise ModelError(f"an ensemble needs at least 2 models, got {len(models)}")
    first = models[0]
    kinds = {(m.arch, m.num_outputs, m.head_kind) for m in models}
    if len(kinds) != 1 or any(isinstance(m, Ensemble) for m in models):
        raise ModelError(f"ensemble members must be single networks of one architecture, head and output count; "
                         f"got {sorted(kinds)}")
    out = Ensemble(first.arch, first.num_outputs, len(models), head=first.head_kind)
    for k, m in enumerate(models):
        out.body.bodies[k].load_state_dict(m.body.state_dict())
        out.head.heads[k].load_state_dict(m.head.state_dict())
    return out.eval()
