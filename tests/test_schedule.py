import math

import pytest
import torch

from cxr.training.schedule import DIV, FINAL_DIV, MOMENTUM, TwoPhaseOneCycle, one_cycle


def test_one_cycle_warms_up_then_anneals_with_inverse_momentum():
    lr0, m0 = one_cycle(0.0, 1e-2)
    lr_peak, m_peak = one_cycle(0.3, 1e-2)
    lr_end, m_end = one_cycle(1.0, 1e-2)
    assert lr0 == pytest.approx(1e-2 / DIV)
    assert lr_peak == pytest.approx(1e-2) and m_peak == pytest.approx(MOMENTUM[1])
    assert lr_end == pytest.approx(1e-2 / (DIV * FINAL_DIV))
    assert m0 == pytest.approx(MOMENTUM[0]) and m_end == pytest.approx(MOMENTUM[0])
    lrs = [one_cycle(t / 100, 1.0)[0] for t in range(101)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))


def _optimizer():
    body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    return torch.optim.AdamW([{"params": body.parameters()}, {"params": head.parameters()}], lr=1.0)


def test_two_phases_freeze_the_body_lr_and_cycle_the_head():
    opt = _optimizer()
    sched = TwoPhaseOneCycle(opt, body_lr=1e-2, head_lr=1e-3, phase1_steps=10, phase2_steps=10)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups] + [opt.param_groups[1]["betas"][0]])
        opt.step()
        sched.step()
    phase1, phase2 = seen[:10], seen[10:]
    assert all(b == h for b, h, _ in phase1)  # both groups follow the same cycle end to end
    assert max(b for b, _, _ in phase1) == pytest.approx(1e-2, rel=0.05)
    assert all(b == 0.0 for b, _, _ in phase2)
    assert max(h for _, h, _ in phase2) == pytest.approx(1e-3, rel=0.05)
    assert min(m for *_, m in seen) < 0.9 < max(m for *_, m in seen)


def test_schedule_state_resumes_exactly():
    opt = _optimizer()
    sched = TwoPhaseOneCycle(opt, body_lr=1e-2, head_lr=1e-3, phase1_steps=8, phase2_steps=4)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = _optimizer()
    sched2 = TwoPhaseOneCycle(opt2, body_lr=1e-2, head_lr=1e-3, phase1_steps=8, phase2_steps=4)
    sched2.load_state_dict(state)
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    assert math.isclose(opt.param_groups[0]["betas"][0], opt2.param_groups[0]["betas"][0])
