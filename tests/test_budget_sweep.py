"""A sweep under a KL budget (``hydra.sweeper.constraints``) as a specification: the real
``OptunaSweep`` on the composed ``sweep=kl_budget`` config and a real SQLite study, with the
stand-in launcher of test_sweeper_loop, whose trials return the summaries a script gives."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate
from optuna.trial import TrialState
from test_sweeper_loop import ScriptedLauncher, read_csv

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from hydra_plugins.klsweep_optuna._sweep import OptunaSweep
from klsweep.config import CONF_DIR

BUDGET = "kl/final <= 0.05"


@pytest.fixture(scope="module")
def config_loader() -> Iterator[Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def summary(reward: float, kl: float) -> Callable[[Mapping[str, Any]], dict[str, float]]:
    return lambda trial: {"reward/final": reward, "kl/final": kl}


def sweep(config_loader: Any, sweep_dir: Path, launcher: ScriptedLauncher,
          *hydra_overrides: str) -> None:
    config = config_loader.load_configuration(
        "config", overrides=["sweep=kl_budget", "task=exact", f"hydra.sweep.dir={sweep_dir}",
                             *hydra_overrides], run_mode=RunMode.MULTIRUN)
    settings = instantiate(config.hydra.sweeper).settings
    context = HydraContext(config_loader=config_loader, callbacks=None)
    OptunaSweep(settings, config, context, launcher).run(list(config.hydra.overrides.task))


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="kl_budget", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def test_infeasible_trials_are_marked_the_best_feasible_wins_and_a_resume_keeps_both(
        config_loader, tmp_path):
    # the highest rewards drift past the budget: the best of the others is trial 2
    launcher = ScriptedLauncher({0: summary(0.9, 0.2), 1: summary(0.5, 0.04),
                                 2: summary(0.6, 0.03), 3: summary(0.99, 0.5)}, tmp_path)
    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=4")

    trials = load(tmp_path).trials
    assert [t.constraints for t in trials] == [
        {BUDGET: pytest.approx(0.15)}, {BUDGET: pytest.approx(-0.01)},
        {BUDGET: pytest.approx(-0.02)}, {BUDGET: pytest.approx(0.45)}]
    assert load(tmp_path).best_trial.number == 2  # Optuna's own pick skips the infeasible
    rows = read_csv(tmp_path / "trials.csv")
    assert [row["feasible"] for row in rows] == ["False", "True", "True", "False"]
    assert float(rows[0][f"[{BUDGET}]"]) == pytest.approx(0.15)
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["constraints"] == [BUDGET]
    assert best["best"]["number"] == 2
    assert best["best"]["constraints"] == {BUDGET: pytest.approx(-0.02)}
    assert "no_feasible_trial" not in best

    # resumed: the old trials keep their feasibility, a new feasible one takes the lead and a
    # new infeasible one with a higher reward does not
    launcher = ScriptedLauncher({4: summary(0.7, 0.049), 5: summary(1.0, 0.051)}, tmp_path)
    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=6")
    assert launcher.numbers == [4, 5]
    study = load(tmp_path)
    assert [t.number for t in study.trials if t.constraints[BUDGET] > 0] == [0, 3, 5]
    assert study.best_trial.number == 4
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["best"]["number"] == 4


def test_no_feasible_trial_is_said_plainly_with_the_least_infeasible(config_loader, tmp_path):
    launcher = ScriptedLauncher({0: summary(0.9, 0.2), 1: summary(0.5, 0.08),
                                 2: summary(0.6, 0.3)}, tmp_path)
    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=3")
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["best"] is None
    assert best["no_feasible_trial"].startswith("none of the 3 complete trials meets every "
                                                "constraint")
    assert best["least_infeasible"]["number"] == 1
    assert best["least_infeasible"]["constraints"] == {BUDGET: pytest.approx(0.03)}


def test_a_summary_without_the_constrained_metric_fails_the_trial_with_its_reason(
        config_loader, tmp_path):
    launcher = ScriptedLauncher({1: lambda trial: {"reward/final": 0.5}}, tmp_path)
    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=2",
          "hydra.sweeper.max_failures=2")
    trial = load(tmp_path).trials[1]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["reason"] == (f"constraint {BUDGET}: kl/final is None in the "
                                          f"run's summary")


def test_a_study_resumed_with_another_budget_is_refused_before_any_trial(config_loader,
                                                                        tmp_path):
    sweep(config_loader, tmp_path, ScriptedLauncher({}, tmp_path), "hydra.sweeper.n_trials=1")
    launcher = ScriptedLauncher({}, tmp_path)
    with pytest.raises(SweepConfigError, match="was run with constraints"):
        sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=2",
              "hydra.sweeper.constraints=['kl/final <= 0.1']")
    assert launcher.batches == []


@pytest.mark.parametrize(("constraint", "message"), [
    ("kl/final < 0.1", "'kl/final < 0.1' must read 'metric <= number' or 'metric >= number'"),
    ("kl/final <= ", "'kl/final <= ' must read 'metric <= number'"),
    ("kl/finale <= 0.1", "'kl/finale <= 0.1': kl/finale is not a number of a run's summary"),
    ("kl/final >= inf", "'kl/final >= inf': the bound 'inf' is not a finite number"),
])
def test_a_bad_constraint_fails_before_any_trial_naming_it(config_loader, tmp_path,
                                                          constraint, message):
    launcher = ScriptedLauncher({}, tmp_path)
    with pytest.raises(SweepConfigError) as err:
        sweep(config_loader, tmp_path / "sweep", launcher,
              f"hydra.sweeper.constraints=['{constraint}']")
    assert str(err.value).startswith(f"klsweep: error: hydra.sweeper.constraints: {message}")
    assert "\n" not in str(err.value)
    assert launcher.batches == [] and not (tmp_path / "sweep").exists()
