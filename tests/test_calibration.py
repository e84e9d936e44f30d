"""cxr.evaluation.calibration: Platt scaling, operating-point policies, Brier skill, equal-mass ECE, the
"not assessed" rule; on synthetic scores whose true calibration is known."""

import numpy as np
import pytest

from cxr.errors import CxrError
from cxr.evaluation import calibration as C


def _scores(n=4000, seed=0, slope=2.0, shift=-1.5):
    """Labels drawn from sigmoid(slope * z + shift): the true Platt parameters are (slope, shift)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(slope * z + shift)))).astype(int)
    return z, y


def test_platt_recovers_the_true_parameters_and_improves_brier():
    z, y = _scores()
    a, b = C.fit_platt(z, y)
    assert a == pytest.approx(2.0, abs=0.2) and b == pytest.approx(-1.5, abs=0.15)
    raw = 1 / (1 + np.exp(-z))  # miscalibrated: slope 1, no shift
    cal = C.apply_platt(z, a, b)
    assert cal.dtype == np.float32
    assert C.brier(y, cal) < C.brier(y, raw)
    assert C.ece(y, cal) < 0.03 < C.ece(y, raw)
    assert C.brier_skill(y, cal) > 0 > C.brier_skill(y, np.full(len(y), 0.9))


def test_brier_skill_of_the_base_rate_is_zero():
    y = np.array([0, 0, 0, 1] * 50)
    assert C.brier_skill(y, np.full(len(y), y.mean())) == pytest.approx(0.0, abs=1e-12)


def test_apply_platt_is_stable_for_huge_logits():
    p = C.apply_platt(np.array([[-1e4, 0.0, 1e4]]), np.ones(3), np.zeros(3))
    assert np.isfinite(p).all() and p[0, 0] == 0.0 and p[0, 1] == 0.5 and p[0, 2] == 1.0


def test_reliability_bins_hold_equal_mass():
    rng = np.random.default_rng(1)
    p = rng.random(1000) ** 3  # skewed: equal-width bins would be nearly empty at the top
    r = C.reliability((rng.random(1000) < p).astype(int), p, bins=10)
    assert r["count"] == [100] * 10
    assert r["predicted"] == sorted(r["predicted"])


@pytest.mark.parametrize("policy", ["spec:0.90", "spec:0.95", "sens:0.80", "youden"])
def test_operating_points_keep_their_promise(policy):
    z, y = _scores(seed=2)
    t = C.threshold(y, z, policy)
    flagged = z >= t
    spec = (~flagged[y == 0]).mean()
    sens = flagged[y == 1].mean()
    kind, _, value = policy.partition(":")
    if kind == "spec":
        assert spec >= float(value)
    elif kind == "sens":
        assert sens >= float(value)
    else:
        assert 0 < sens < 1 and 0 < spec < 1


def test_specificity_policy_flags_far_fewer_films_than_youden():
    z, y = _scores(seed=3, slope=0.7)  # a weak model, like the sample-film one
    youden = (z >= C.threshold(y, z, "youden")).mean()
    spec90 = (z >= C.threshold(y, z, "spec:0.9")).mean()
    assert spec90 < youden / 2 and spec90 < 0.2  # 10% of negatives + some positives


def test_bad_policy_and_too_few_positives_are_refused_with_a_reason():
    with pytest.raises(CxrError, match="youden, spec:X or sens:X"):
        C.Policy.parse("spec:1.5")
    with pytest.raises(C.CalibrationError, match="Hernia: 2 positive"):
        C.fit_platt(np.arange(50.0), np.r_[np.zeros(48), np.ones(2)], name="Hernia")


def test_not_assessed_when_the_auc_interval_reaches_chance():
    assert C.assessed(0.55) == (True, None)
    ok, why = C.assessed(0.43)
    assert not ok and "0.43" in why
    assert C.assessed(None)[0] is False


def test_a_backwards_or_unfittable_finding_gets_its_base_rate_not_an_inverted_score():
    z, y = _scores(seed=4)
    a, b, note = C.fit_or_base_rate(-z, y, "Edema")  # ranked backwards: a plain fit would invert it
    assert a == 0.0 and "base rate" in note
    assert C.apply_platt(np.array([-5.0, 5.0]), a, b) == pytest.approx([y.mean()] * 2, abs=0.01)
    a, b, note = C.fit_or_base_rate(np.arange(50.0), np.r_[np.zeros(49), np.ones(1)], "Hernia")
    assert a == 0.0 and "Hernia: 1 positive" in note
    assert C.fit_or_base_rate(z, y)[2] is None
