"""One-cycle learning rate and momentum (Smith 2017; the paper's Fig. 5), over the paper's two phases.

Phase 1 trains end to end; phase 2 freezes the body and retrains the head on its own one-cycle. One
scheduler covers both so that a run resumed from any epoch, in either phase, continues the same curve.
Parameter group 0 is the body, group 1 the head.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler

PCT_UP = 0.3          # fraction of a cycle spent warming up (fastai's default)
DIV = 25.0            # start at max_lr / DIV
FINAL_DIV = 1e4       # end at max_lr / (DIV * FINAL_DIV)
MOMENTUM = (0.95, 0.85)  # Adam beta1: high when the LR is low, low at the LR peak


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def one_cycle(t: float, max_lr: float) -> tuple[float, float]:
    """(lr, momentum) at fraction t in [0, 1] of one cycle."""
    t = min(max(t, 0.0), 1.0)
    if t < PCT_UP:
        u = t / PCT_UP
        return _cos(max_lr / DIV, max_lr, u), _cos(MOMENTUM[0], MOMENTUM[1], u)
    u = (t - PCT_UP) / (1 - PCT_UP)
    return _cos(max_lr, max_lr / (DIV * FINAL_DIV), u), _cos(MOMENTUM[1], MOMENTUM[0], u)


class TwoPhaseOneCycle(LRScheduler):
    def __init__(self, optimizer, body_lr: float, head_lr: float, phase1_steps: int, phase2_steps: int):
        self.body_lr, self.head_lr = body_lr, head_lr
        self.phase1_steps, self.phase2_steps = phase1_steps, phase2_steps
        super().__init__(optimizer)

    def _values(self, step: int) -> list[tuple[float, float]]:
        if step < self.phase1_steps or self.phase2_steps == 0:
            v = one_cycle(step / max(1, self.phase1_steps), self.body_lr)
            return [v, v]
        head = one_cycle((step - self.phase1_steps) / self.phase2_steps, self.head_lr)
        return [(0.0, head[1]), head]

    def get_lr(self) -> list[float]:
        values = self._values(self.last_epoch)
        for group, (_, momentum) in zip(self.optimizer.param_groups, values):
            beta2 = group["betas"][1]
            group["betas"] = (momentum, beta2)
        return [lr for lr, _ in values][: len(self.optimizer.param_groups)]
