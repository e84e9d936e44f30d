"""cxr.training.losses against the paper's equations written out by hand, and against torch's unweighted losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr.training.losses import make_loss

LOGITS_2 = [[0.2, -1.0], [1.5, 0.3], [-0.7, 2.2], [0.0, 0.4]]
CLASSES = [0, 1, 1, 0]
LOGITS_ML = [[0.5, -2.0, 1.0], [-0.3, 0.8, 3.0]]
Y_ML = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def eq1_class_weights(counts: list[int]) -> list[float]:
    """Eq. 1 (sklearn 'balanced'): n_samples / (n_classes * n_c)."""
    n = sum(counts)
    return [n / (len(counts) * c) for c in counts]


def test_eq1_example():
    assert eq1_class_weights([90, 10]) == [100 / 180, 5.0]


def test_weighted_ce_is_eq2():
    w = eq1_class_weights([90, 10])
    # Eq. 2 per image: weight[class] * (-x[class] + log(sum_j exp(x[j]))); torch's (and the paper's) "mean"
    # divides the sum by the total weight of the targets' classes.
    per_image = [w[c] * (-x[c] + math.log(sum(math.exp(v) for v in x))) for x, c in zip(LOGITS_2, CLASSES)]
    expected = sum(per_image) / sum(w[c] for c in CLASSES)
    loss = make_loss("weighted", "pneumothorax", class_weights=np.array(w))
    got = loss(torch.tensor(LOGITS_2), torch.tensor(CLASSES))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Class indices that arrive as floats (a collated numpy batch) are the same targets.
    assert loss(torch.tensor(LOGITS_2), torch.tensor(CLASSES, dtype=torch.float32)).item() == pytest.approx(expected)


def test_weighted_bce_is_eq3():
    p = [4.0, 0.5, 2.0]  # p_c, one per finding

    def log_sigmoid(v: float) -> float:
        return -math.log1p(math.exp(-v))

    # Eq. 3 with w_nc = 1: l_nc = -[p_c y log s(x) + (1 - y) log(1 - s(x))], and log(1 - s(x)) = log s(-x).
    terms = [-(p[c] * y[c] * log_sigmoid(x[c]) + (1 - y[c]) * log_sigmoid(-x[c]))
             for x, y in zip(LOGITS_ML, Y_ML) for c in range(3)]
    expected = sum(terms) / len(terms)
    loss = make_loss("weighted", "multilabel", pos_weight=torch.tensor(p))
    assert loss(torch.tensor(LOGITS_ML), torch.tensor(Y_ML)).item() == pytest.approx(expected, rel=1e-6)
    paper = make_loss("weighted", "multilabel-paper", pos_weight=p)
    assert paper(torch.tensor(LOGITS_ML), torch.tensor(Y_ML)).item() == pytest.approx(expected, rel=1e-6)


def test_unweighted_equals_torch_and_ignores_weights():
    x2, c = torch.tensor(LOGITS_2), torch.tensor(CLASSES)
    ce = make_loss("unweighted", "pneumothorax", class_weights=[1.0, 9.0])
    assert torch.equal(ce(x2, c), F.cross_entropy(x2, c))
    xm, y = torch.tensor(LOGITS_ML), torch.tensor(Y_ML)
    bce = make_loss("unweighted", "multilabel", pos_weight=[9.0, 9.0, 9.0])
    assert torch.equal(bce(xm, y), F.binary_cross_entropy_with_logits(xm, y))
    assert make_loss("weighted", "multilabel", pos_weight=[9.0, 9.0, 9.0])(xm, y) > bce(xm, y)


def test_weights_are_buffers_that_follow_the_module():
    loss = make_loss("weighted", "pneumothorax", class_weights=[0.5, 5.0])
    assert dict(loss.named_buffers())["weight"].tolist() == [0.5, 5.0]
    assert loss.to(torch.float64).weight.dtype == torch.float64
    assert loss.to("meta").weight.device.type == "meta"
    assert make_loss("weighted", "multilabel", pos_weight=np.ones(14)).pos_weight.shape == (14,)


def test_bf16_logits_give_a_float32_loss():
    loss = make_loss("weighted", "multilabel", pos_weight=[4.0, 0.5, 2.0])
    xm, y = torch.tensor(LOGITS_ML), torch.tensor(Y_ML)
    low = loss(xm.bfloat16(), y)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss(xm, y).item(), rel=2e-2)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "focal", "task": "multilabel"}, "unknown loss"),
    ({"kind": "weighted", "task": "segmentation"}, "unknown task"),
    ({"kind": "weighted", "task": "pneumothorax"}, "needs class_weights"),
    ({"kind": "weighted", "task": "multilabel"}, "needs pos_weight"),
    ({"kind": "weighted", "task": "pneumothorax", "class_weights": [1.0, 2.0, 3.0]}, "2 values"),
    ({"kind": "weighted", "task": "multilabel", "pos_weight": [1.0, -2.0]}, "> 0"),
    ({"kind": "weighted", "task": "multilabel", "pos_weight": [[1.0, 2.0]]}, "1-D"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_loss(**kwargs)
