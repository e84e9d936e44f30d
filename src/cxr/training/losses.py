"""The paper's losses: class-weighted cross entropy for pneumothorax vs all (Eq. 2, weights from Eq. 1) and
BCE-with-logits with a positive weight per finding for the multi-label task (Eq. 3), or their unweighted forms.

Weights are buffers of a small nn.Module, so `.to(device)` (which Lightning calls) moves them with the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr.errors import CxrError
from cxr.tasks import get_task

KINDS = ("weighted", "unweighted")


def _as_weights(values, name: str, length: int | None = None) -> torch.Tensor:
    """A 1-D float32 tensor of finite positive weights from a list, numpy array or tensor."""
    t = torch.as_tensor(np.asarray(values.detach().cpu() if torch.is_tensor(values) else values,
                                   dtype=np.float32))
    if t.dim() != 1 or (length is not None and t.numel() != length):
        want = f"{length} values" if length is not None else "a 1-D sequence"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"{name} must be finite and > 0, got {t.tolist()}")
    return t


class WeightedCrossEntropy(nn.Module):
    """Eq. 2: loss = weight[class] * (-x[class] + log sum_j exp(x[j])), mean over the batch.

    Like torch (and so the paper), the weighted mean divides by the sum of the targets' weights, not by N.
    weight=None is plain cross entropy.
    """

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Targets may arrive as float class indices from a collated numpy batch.
        if target.dim() == 1 and target.is_floating_point():
            target = target.long()
        # float32 even under bf16 autocast: the log-sum-exp of a 2-way softmax is cheap and precision matters.
        return F.cross_entropy(logits.float(), target, weight=self.weight)


class WeightedBCE(nn.Module):
    """Eq. 3: l_nc = -[p_c y_nc log s(x_nc) + (1 - y_nc) log(1 - s(x_nc))], mean over batch and findings.

    The paper's per-element w_nc is 1; p_c (pos_weight) > 1 favours recall on rare findings. None: plain BCE.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=self.pos_weight)


def make_loss(kind: str = "weighted", task: str = "multilabel", class_weights=None, pos_weight=None) -> nn.Module:
    """The training loss for a task.

    weighted + a softmax task (pneumothorax): class_weights, one per class (Eq. 1: n_samples / (n_classes * n_c)),
    are required.
    weighted + a sigmoid task (multilabel): pos_weight (one per output, e.g. n_negative / n_positive) is required.
    unweighted: plain CrossEntropyLoss / BCEWithLogitsLoss; any weights passed are ignored.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss {kind!r}; expected one of: {', '.join(KINDS)}")
    weighted = kind == "weighted"
    try:
        spec = get_task(task)
    except CxrError as e:
        raise ValueError(str(e)) from None
    if spec.softmax:  # exclusive classes: cross entropy (Eq. 2)
        if weighted and class_weights is None:
            raise ValueError(f"the weighted loss for the {len(spec.outputs)}-class task needs class_weights (Eq. 1)")
        n = len(spec.outputs)
        return WeightedCrossEntropy(_as_weights(class_weights, "class_weights", n) if weighted else None)
    if weighted and pos_weight is None:
        raise ValueError("the weighted multi-label loss needs pos_weight (one value per finding)")
    return WeightedBCE(_as_weights(pos_weight, "pos_weight") if weighted else None)
