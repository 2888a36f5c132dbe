"""When a trial's KL has broken its budget for good (klsweep.budget), and the real sweep
prunes such a trial saying why."""

from __future__ import annotations

import pytest
import yaml
from optuna.trial import TrialState
from test_sweeper import FAST, klsweep, load

from klsweep.budget import Constraint, budget_breach, constraint_values, logged_key

OPEN_LOOP = {"feedback": False, "margin": 0.5, "min_progress": 0.5}
FEEDBACK = {"feedback": True, "margin": 0.5, "min_progress": 0.5}


def test_a_constraint_value_is_positive_by_how_much_the_bound_is_broken():
    at_most, at_least = Constraint("kl/final", "<=", 0.05), Constraint("reward/final", ">=", 0.6)
    assert at_most.value(0.08) == pytest.approx(0.03)
    assert at_least.value(0.5) == pytest.approx(0.1)
    assert constraint_values([at_most, at_least], {"kl/final": 0.01, "reward/final": 0.9}) == (
        {"kl/final <= 0.05": pytest.approx(-0.04), "reward/final >= 0.6": pytest.approx(-0.3)},
        None)


def test_only_last_quarter_kl_means_can_be_pruned_on():
    assert logged_key("kl/final") == "kl/mean"
    assert logged_key("kl/seq_final") == "kl/seq"
    assert logged_key("kl/beta_final") is None  # the last β, not a mean of a KL
    assert logged_key("reward/final") is None


def test_a_feedback_schedule_is_pruned_only_once_the_window_alone_breaks_the_bound():
    # 8 steps: the final value is the mean of steps 6 and 7
    high = [1.0] * 6
    assert budget_breach(high, 8, 0.05, **FEEDBACK) is None  # β may still bring it to 0
    # step 6 logged 0.2: even with 0 at step 7 the window's mean is 0.1 > 0.05
    reason = budget_breach([*high, 0.2], 8, 0.05, **FEEDBACK)
    assert reason.startswith("over the KL budget 0.05 whatever the rest of the run logs")
    # 0.08 at step 6 leaves a mean of 0.04 possible
    assert budget_breach([*high, 0.08], 8, 0.05, **FEEDBACK) is None
    # after the last step the run completes and is recorded as infeasible instead
    assert budget_breach([*high, 0.2, 0.2], 8, 0.05, **FEEDBACK) is None


def test_an_open_loop_schedule_is_pruned_past_min_progress_when_over_by_the_margin():
    # 8 steps, 4 done: the running last-quarter mean is that of step 3 alone
    assert budget_breach([0.0, 0.0, 0.0, 0.076], 8, 0.05, **OPEN_LOOP).endswith(
        "last-quarter mean 0.076 after 4 of 8 steps")
    assert budget_breach([0.0, 0.0, 0.0, 0.074], 8, 0.05, **OPEN_LOOP) is None  # under 1.5x
    assert budget_breach([0.0, 0.0, 0.9], 8, 0.05, **OPEN_LOOP) is None  # too early
    assert budget_breach([0.0, 0.0, 0.0, 0.9], 8, 0.05,
                         **(OPEN_LOOP | {"margin": None})) is None  # margin off


@pytest.mark.slow
def test_the_sweep_prunes_a_trial_past_its_kl_budget_and_records_why(tmp_path):
    # a budget no trained policy meets: the fixed β is pruned once half its steps ran, the
    # adaptive one only when its last-quarter window is over the bound whatever comes next
    result = klsweep("sweep=kl_budget", "steps=8", *FAST, "optim.lr=1e-2",
                     "hydra.sweeper.constraints=['kl/final <= 1e-7']",
                     "hydra.sweeper.sampler.name=grid", "kl.beta=0.05", "kl.target=0.05",
                     "schedule=choice(fixed, adaptive)", "hydra.sweeper.report_every=1",
                     "hydra.sweeper.n_trials=2", sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load(tmp_path, "kl_budget")
    pruned = {t.params["schedule"]: t for t in study.trials}
    assert {t.state for t in pruned.values()} == {TrialState.PRUNED}
    assert pruned["fixed"].user_attrs["reason"].startswith(
        "pruned after step 4: kl/final over the KL budget 1e-07 by more than 50% with an "
        "open-loop β")
    assert pruned["adaptive"].user_attrs["reason"].startswith(
        "pruned after step 7: kl/final over the KL budget 1e-07 whatever the rest")
    for trial in pruned.values():  # pruned with the constraint value it had
        assert trial.constraints["kl/final <= 1e-07"] > 0
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["best"] is None
