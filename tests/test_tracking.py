"""Each tracking metric against a trajectory worked out by hand."""

import math

import numpy as np
import pytest

from klsweep.tracking import (
    beta_volatility,
    mean_std,
    overshoot,
    run_tracking,
    steps_to_target,
    tracking_error,
    trailing_mean,
)

TARGET = 0.05  # the band ±20% is [0.04, 0.06]


def test_trailing_mean_averages_the_window_ending_at_each_step():
    assert trailing_mean([1, 2, 3, 4, 5], 3) == pytest.approx([1, 1.5, 2, 3, 4])
    assert trailing_mean([2, 4], 1) == pytest.approx([2, 4])


def test_steps_to_target_is_the_step_after_the_last_exit_from_the_band():
    kl = [0.0, 0.02, 0.05, 0.09, 0.055, 0.045, 0.05]  # inside at 2, leaves at 3, back from 4
    steps = [0, 1, 2, 3, 4, 5, 6]
    assert steps_to_target(steps, kl, TARGET) == 4


def test_steps_to_target_reports_the_logged_step_not_the_row_index():
    # a KL measured every 5 steps (as DPO's evaluations): settled from the 3rd measurement
    assert steps_to_target([4, 9, 14, 19], [0.2, 0.07, 0.05, 0.041], TARGET) == 14


def test_steps_to_target_edges():
    assert steps_to_target([0, 1, 2], [0.05, 0.048, 0.059], TARGET) == 0  # always inside
    assert math.isnan(steps_to_target([0, 1, 2], [0.05, 0.05, 0.061], TARGET))  # left at end
    assert math.isnan(steps_to_target([], [], TARGET))
    # the band edges count as inside: 0.04 and 0.06 are exactly ±20%
    assert steps_to_target([0, 1, 2], [0.1, 0.04, 0.06], TARGET) == 1


def test_overshoot_is_the_largest_kl_over_the_target():
    assert overshoot([0.0, 0.03, 0.125, 0.05], TARGET) == pytest.approx(2.5)
    assert overshoot([0.01, 0.02], TARGET) == pytest.approx(0.4)


def test_tracking_error_averages_the_relative_distance_over_the_second_half():
    # 7 values: the second half is the last 4 (index 3 on); |x - 0.05| = 0.05, 0.01, 0, 0.02
    kl = [1.0, 1.0, 1.0, 0.1, 0.06, 0.05, 0.03]
    assert tracking_error(kl, TARGET) == pytest.approx((1.0 + 0.2 + 0.0 + 0.4) / 4)
    assert tracking_error([TARGET] * 6, TARGET) == 0.0


def test_beta_volatility_is_zero_for_constant_and_straight_line_beta():
    assert beta_volatility([0.1] * 10) == 0.0
    assert beta_volatility(np.linspace(0.1, 0.0, 50)) == 0.0
    assert beta_volatility(np.linspace(0.05, 0.00025, 200)) == 0.0
    assert beta_volatility([0.0, 0.0, 0.0]) == 0.0


def test_beta_volatility_of_a_beta_jumping_back_and_forth():
    # changes +1, -1, +1, -1: std 1 (population); mean β = 7/5
    assert beta_volatility([1, 2, 1, 2, 1]) == pytest.approx(1 / 1.4)
    # relative: the same pattern at a hundredth of the scale is as volatile
    assert beta_volatility([0.01, 0.02, 0.01, 0.02, 0.01]) == pytest.approx(1 / 1.4)


def test_run_tracking_smooths_settling_and_overshoot_but_not_the_error():
    # KL twice the target for 20 steps, then on target: with a 10-step trailing mean the
    # smoothed KL is 0.05 + 0.05·k/10 with k old steps in the window, inside the band once
    # k ≤ 2, i.e. from step 27 (window 18..27)
    kl = [0.1] * 20 + [0.05] * 30
    rows = [{"step": i, "kl/mean": v, "kl/beta": 0.1} for i, v in enumerate(kl)]
    metrics = run_tracking(rows, TARGET, window=10)
    assert metrics["tracking/steps_to_target"] == 27
    assert metrics["tracking/overshoot"] == pytest.approx(2.0)
    assert metrics["tracking/error"] == 0.0  # second half (25..49) is on target
    assert metrics["tracking/beta_volatility"] == 0.0
    # one batch 40% above target is averaged away: the smoothed peak is 0.05 + 0.02/10, the
    # run counts as settled from the start; unsmoothed it settles only after the spike
    spiky = [{"step": i, "kl/mean": 0.07 if i == 40 else 0.05, "kl/beta": 0.1}
             for i in range(50)]
    assert run_tracking(spiky, TARGET)["tracking/overshoot"] == pytest.approx(1.04)
    assert run_tracking(spiky, TARGET)["tracking/steps_to_target"] == 0
    assert run_tracking(spiky, TARGET, window=1)["tracking/steps_to_target"] == 41


def test_run_tracking_skips_rows_without_the_kl_key_and_reads_kl_seq():
    rows = [{"step": 0, "kl/beta": 1.0}, {"step": 1, "kl/seq": 6.0, "kl/beta": 2.0},
            {"step": 2, "kl/beta": 1.0}, {"step": 3, "kl/seq": 3.0, "kl/beta": 2.0},
            {"step": 4, "kl/beta": 1.0}]
    metrics = run_tracking(rows, 3.0, kl_key="kl/seq", window=1)
    assert metrics["tracking/steps_to_target"] == 3
    assert metrics["tracking/overshoot"] == pytest.approx(2.0)
    assert metrics["tracking/error"] == pytest.approx(0.0)  # second half: the value 3.0
    assert metrics["tracking/beta_volatility"] == pytest.approx(1 / 1.4)  # every row's β


def test_mean_std_over_seeds_ignores_runs_without_a_value():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)  # sample std, ddof = 1
    assert mean_std([4.0, math.nan, None]) == (4.0, 0.0, 1)
    mean, std, n = mean_std([math.nan])
    assert math.isnan(mean) and math.isnan(std) and n == 0
