"""The paper's head (fastai v1's create_head) and CxrNet: body -> feature map -> head -> logits."""

from __future__ import annotations

import torch
from torch import nn

from cxr.nets.registry import get_architecture

HIDDEN = 512  # fastai's create_head: one hidden layer of 512


class AdaptiveConcatPool2d(nn.Module):
    """fastai's pooling: max and average pooled features side by side (max first, as fastai orders them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.amax(x, dim=(2, 3)), torch.mean(x, dim=(2, 3))], dim=1)


def make_head(num_features: int, num_outputs: int, dropout: tuple[float, float]) -> nn.Sequential:
    """The paper's head (fastai v1 create_head): concat-pool, flatten, [BN, Dropout, Linear, ReLU] x 2.

    Linear layers keep their bias (fastai v1's bn_drop_lin, the paper's 2020 version). Weights get
    fastai's init: kaiming-normal for the Linear weights, zero biases, BatchNorm left at 1/0.
    """
    p1, p2 = dropout
    head = nn.Sequential(
        AdaptiveConcatPool2d(), nn.Flatten(1),
        nn.BatchNorm1d(2 * num_features), nn.Dropout(p1), nn.Linear(2 * num_features, HIDDEN), nn.ReLU(),
        nn.BatchNorm1d(HIDDEN), nn.Dropout(p2), nn.Linear(HIDDEN, num_outputs),
    )
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return head


def linear_head(num_features: int, num_outputs: int) -> nn.Sequential:
    """torchvision's DenseNet classifier (imported models: CheXNet, torchxrayvision): average pool, Linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(num_features, num_outputs))


class CxrNet(nn.Module):
    """body -> feature map (the Grad-CAM target) -> head -> logits. The body comes from the registry.
    head: "paper" (make_head) or "linear" (linear_head), as ModelMeta.head records."""

    members = 1  # networks inside (cxr.nets.ensemble.Ensemble holds several)

    def __init__(self, arch: str, num_outputs: int, dropout: tuple[float, float] = (0.25, 0.5),
                 head: str = "paper") -> None:
        super().__init__()
        spec = get_architecture(arch)
        self.arch, self.num_outputs, self.head_kind = arch, num_outputs, head
        self.body = spec.body()
        self.head = (linear_head(self.body.num_features, num_outputs) if head == "linear"
                     else make_head(self.body.num_features, num_outputs, dropout))
        self.body_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(fmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def train(self, mode: bool = True) -> CxrNet:
        # Lightning calls .train() at every epoch start and after validation: a frozen body's BatchNorm
        # must stay in eval mode through that, or its running statistics would drift while "frozen".
        super().train(mode)
        if self.body_frozen:
            self.body.eval()
        return self


def freeze_body(model: CxrNet, frozen: bool = True) -> None:
    """Freeze (or unfreeze) the body: no gradients, and BatchNorm statistics fixed (eval mode) while frozen.

    Unlike fastai's default (train_bn=True) the body's BatchNorm layers freeze too. The head is untouched.
    """
    model.body_frozen = frozen
    for p in model.body.parameters():
        p.requires_grad_(not frozen)
    model.body.train(model.training and not frozen)
