"""β schedules, step by step against their formulas."""

import math

import pytest

from klsweep.kl import SCHEDULES, make_schedule


def test_every_schedule_is_registered():
    assert set(SCHEDULES) == {"fixed", "adaptive", "multiplicative", "linear", "cosine",
                              "exponential", "pid", "dual"}


def test_fixed_keeps_beta():
    s = make_schedule("fixed", beta=0.3, target=0.05)
    assert [s.update(kl, 64) for kl in (0.0, 1.0, 100.0)] == [0.3, 0.3, 0.3]


def test_adaptive_follows_ziegler_et_al():
    s = make_schedule("adaptive", beta=0.1, target=0.05, horizon=10000)
    beta = 0.1
    for kl in (0.07, 0.5, 0.01, 0.05):
        error = min(max(kl / 0.05 - 1, -0.2), 0.2)
        beta = beta * (1 + error * 64 / 10000)
        assert s.update(kl=kl, n_samples=64) == pytest.approx(beta, rel=1e-12)


def test_multiplicative_steps_outside_the_band_only():
    s = make_schedule("multiplicative", beta=1.0, target=0.1)
    assert s.update(0.2, 1) == pytest.approx(1.1)      # > 1.5·target
    assert s.update(0.1, 1) == pytest.approx(1.1)      # inside the band
    assert s.update(0.01, 1) == pytest.approx(0.99)    # < 0.5·target


@pytest.mark.parametrize("name,expected", [
    ("linear", lambda t: 1.0 + (0.2 - 1.0) * t / 4),
    ("cosine", lambda t: 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t / 4))),
    ("exponential", lambda t: 1.0 * (0.2 / 1.0) ** (t / 4)),
])
def test_time_schedules_interpolate_then_hold(name, expected):
    s = make_schedule(name, beta=1.0, beta_end=0.2, steps=4)
    got = [s.update(kl=123.0, n_samples=1) for _ in range(6)]
    want = [expected(min(t, 4)) for t in range(1, 7)]
    assert got == pytest.approx(want, rel=1e-12)


def test_pid_acts_on_log_beta_with_clipped_integral():
    s = make_schedule("pid", beta=0.1, target=0.05, kp=0.5, ki=0.1, kd=0.2, windup=1.5)
    integral, prev = 0.0, None
    for kl in (0.1, 0.1, 0.2, 0.0):
        e = (kl - 0.05) / 0.05
        integral = min(max(integral + e, -1.5), 1.5)
        d = 0.0 if prev is None else e - prev
        prev = e
        want = 0.1 * math.exp(0.5 * e + 0.1 * integral + 0.2 * d)
        assert s.update(kl, 1) == pytest.approx(want, rel=1e-12)


def test_pid_integral_stops_while_beta_is_pinned_at_a_bound():
    s = make_schedule("pid", beta=0.1, target=0.05, kp=1.0, ki=1.0, beta_max=0.2)
    for _ in range(5):
        s.update(1.0, 1)  # KL far above target: β pinned at beta_max
    assert s.beta == 0.2
    assert s.integral == pytest.approx(19.0)  # integrated once, then frozen while pinned
    s.update(0.0, 1)                          # error turns negative: integration resumes
    assert s.integral == pytest.approx(18.0)


def test_dual_ascent_on_the_kl_constraint():
    s = make_schedule("dual", beta=0.1, target=0.05, lr=2.0)
    assert s.update(0.1, 1) == pytest.approx(0.2)
    assert s.update(0.0, 1) == pytest.approx(0.1)
    assert s.update(0.0, 1) == pytest.approx(0.0)
    assert s.update(0.0, 1) == 0.0  # β never goes negative


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_beta_is_clamped_to_its_bounds(name):
    kwargs = dict(beta=0.5, target=0.05, beta_min=0.2, beta_max=0.6, beta_end=0.01, steps=3,
                  lr=10.0, horizon=10.0, kp=5.0)
    s = make_schedule(name, **kwargs)
    for kl in (10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0):
        assert 0.2 <= s.update(kl, 64) <= 0.6


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_state_dict_round_trip_resumes_exactly(name):
    kwargs = dict(beta=0.3, target=0.05, beta_end=0.01, steps=10)
    kls = [0.01, 0.2, 0.07, 0.03, 0.5, 0.05, 0.0]
    straight = make_schedule(name, **kwargs)
    for kl in kls:
        straight.update(kl, 64)
    first = make_schedule(name, **kwargs)
    for kl in kls[:3]:
        first.update(kl, 64)
    resumed = make_schedule(name, **kwargs)
    resumed.load_state_dict(first.state_dict())
    for kl in kls[3:]:
        resumed.update(kl, 64)
    assert resumed.state_dict() == straight.state_dict()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="target must be > 0"):
        make_schedule("adaptive", beta=0.1, target=0.0)
    with pytest.raises(TypeError, match="horizn"):
        make_schedule("adaptive", beta=0.1, target=0.05, horizn=5)
    with pytest.raises(ValueError, match="allowed: fixed, adaptive"):
        make_schedule("sigmoid", beta=0.1)
