"""The sweep loop as a specification: the real ``OptunaSweep`` on the real composed config and
a real SQLite study, with a stand-in launcher that trains nothing. Each trial ends as a script
says: a summary, an exception, or pruned after reporting to the study as a run does."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hydra_plugins.klsweep_optuna._errors import SweepStopped
from hydra_plugins.klsweep_optuna._sweep import OptunaSweep
from klsweep.config import CONF_DIR
from klsweep.pruning import TrialPruning

# the task overrides of ``python -m klsweep -m sweep=beta_target task=exact``
ARGUMENTS = ["sweep=beta_target", "task=exact"]
# one objective, so that trials can report to a pruner; no sampler seed shift to reason about
SINGLE_OBJECTIVE = ["hydra.sweeper.objectives={kl/final:null}"]
PARSER = OverridesParser.create()


class Diverged(RuntimeError):
    """A run's own failure, as klsweep.module.RunFailed: its ``status`` goes to the trial."""

    status = "diverged"


def returns(value: float) -> Callable[[Mapping[str, Any]], dict[str, float]]:
    return lambda trial: {"reward/final": value, "kl/final": trial["kl.beta"]}


def raises(error: BaseException) -> Callable[[Mapping[str, Any]], Any]:
    def run(trial: Mapping[str, Any]) -> Any:
        raise error
    return run


def pruned(trial: Mapping[str, Any]) -> Any:
    """What TrialPruning does in a run: report through the storage it was given, then stop."""
    callback = TrialPruning(trial["trial.storage"], trial["trial.study_name"],
                            trial["trial.number"])
    callback.trial.report(0.25, step=5)
    raise optuna.TrialPruned("pruned after step 5: reward/final = 0.25")


class ScriptedLauncher:
    """A Hydra launcher's shape, ``launch(job_overrides, initial_job_idx) -> [JobReturn]``:
    trial number ``n`` runs ``script[n]`` (default: a summary) on its overrides, and a run
    that raises returns FAILED with the exception, as Hydra's ``run_job`` does."""

    def __init__(self, script: Mapping[int, Callable[[Mapping[str, Any]], Any]],
                 sweep_dir: Path) -> None:
        self.script, self.sweep_dir = script, sweep_dir
        self.batches: list[tuple[int, list[list[str]]]] = []

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> list[JobReturn]:
        self.batches.append((initial_job_idx, [list(job) for job in job_overrides]))
        return [self.run(list(job)) for job in job_overrides]

    def run(self, job: list[str]) -> JobReturn:
        trial = {o.key_or_group: o.value() for o in PARSER.parse_overrides(job)}
        output_dir = self.sweep_dir / str(trial["hydra.sweep.subdir"])
        hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(output_dir)}}})
        result = JobReturn(overrides=job, hydra_cfg=hydra_cfg, status=JobStatus.COMPLETED)
        try:
            result.return_value = self.script.get(trial["trial.number"], returns(0.5))(trial)
        except Exception as err:
            result.status, result.return_value = JobStatus.FAILED, err
        return result

    @property
    def numbers(self) -> list[int]:
        return [int(o.split("=")[1]) for _, jobs in self.batches for job in jobs
                for o in job if o.startswith("trial.number=")]


@pytest.fixture(scope="module")
def config_loader() -> Iterator[Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def sweep(config_loader: Any, sweep_dir: Path, launcher: ScriptedLauncher,
          *hydra_overrides: str) -> None:
    """Run the loop as KLSweepOptunaSweeper.sweep builds it: the settings Hydra instantiates
    the sweeper with, the composed multirun config, the task overrides as arguments."""
    config = config_loader.load_configuration(
        "config", overrides=[*ARGUMENTS, f"hydra.sweep.dir={sweep_dir}", *hydra_overrides],
        run_mode=RunMode.MULTIRUN)
    settings = instantiate(config.hydra.sweeper).settings
    context = HydraContext(config_loader=config_loader, callbacks=None)
    OptunaSweep(settings, config, context, launcher).run(list(config.hydra.overrides.task))


def study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="beta_target",
                             storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def by_state(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for trial in trials:
        found.setdefault(trial.state.name, []).append(trial.number)
    return found


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_resumed_study_ends_with_exactly_n_trials_complete_or_pruned(config_loader,
                                                                       tmp_path, caplog):
    space = {"kl.beta": FloatDistribution(0.001, 1.0, log=True),
             "kl.target": FloatDistribution(0.01, 0.5)}
    held = optuna.create_study(study_name="beta_target", direction="maximize",
                               storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for state, extra in ((TrialState.COMPLETE, {"value": 0.7}),
                         (TrialState.PRUNED, {"intermediate_values": {5: 0.1}}),
                         (TrialState.FAIL, {"user_attrs": {"reason": "loss is nan at step 0"}})):
        held.add_trial(create_trial(state=state, params={"kl.beta": 0.1, "kl.target": 0.1},
                                    distributions=space, **extra))
    launcher = ScriptedLauncher({4: raises(Diverged("KL 9.1 > kl.max")), 5: pruned},
                                tmp_path)

    with caplog.at_level(logging.INFO, logger="klsweep.sweep"):
        sweep(config_loader, tmp_path, launcher, *SINGLE_OBJECTIVE, "hydra.sweeper.n_trials=5",
              "hydra.sweeper.pruner.name=median")

    # two finished trials held, three more to run; the failure in between does not count
    assert launcher.numbers == [3, 4, 5, 6]
    # a launcher that reports nothing itself: each trial's start and end, and the study's
    # progress after each end, the held trials counted
    lines = [record.getMessage() for record in caplog.records]
    for number in (3, 4, 5, 6):
        started = f"klsweep: trial {number} started · beta="
        assert sum(line.startswith(started) for line in lines) == 1
    assert any(line.startswith("klsweep: trial 5 PRUNED · pruned after step 5: reward/final = "
                               "0.25 · beta=") for line in lines)
    assert any(line.startswith("klsweep: trial 4 FAIL · KL 9.1 > kl.max · beta=") for line in lines)
    progress = [line for line in lines if line.startswith("klsweep: study beta_target: ")
                and " trials done · " in line]
    assert len(progress) == 4
    assert progress[-1].startswith("klsweep: study beta_target: 5 of 5 trials done · "
                                   "3 COMPLETE, 2 PRUNED, 2 FAIL · 0 running · ")
    trials = study(tmp_path).trials
    assert by_state(trials) == {"COMPLETE": [0, 3, 6], "PRUNED": [1, 5], "FAIL": [2, 4]}
    # pruned, not failed, with what it reported through the storage the trial was given
    assert trials[5].intermediate_values == {5: 0.25}
    assert trials[5].user_attrs["reason"] == "pruned after step 5: reward/final = 0.25"
    assert trials[5].user_attrs["status"] == "pruned"


def test_a_failing_trial_is_recorded_as_fail_with_its_reason_and_the_sweep_goes_on(
        config_loader, tmp_path):
    launcher = ScriptedLauncher({1: raises(RuntimeError("probability tensor contains inf")),
                                 2: raises(Diverged("KL 9.1 > kl.max")),
                                 3: returns(float("nan"))}, tmp_path)

    sweep(config_loader, tmp_path, launcher, *SINGLE_OBJECTIVE, "hydra.sweeper.n_trials=2",
          "hydra.sweeper.max_failures=4")  # the default, n_trials, would stop at the third

    trials = study(tmp_path).trials
    assert by_state(trials) == {"COMPLETE": [0, 4], "FAIL": [1, 2, 3]}
    reasons = {t.number: t.user_attrs.get("reason") for t in trials}
    assert reasons[1] == "RuntimeError: probability tensor contains inf"
    assert reasons[2] == "KL 9.1 > kl.max" and trials[2].user_attrs["status"] == "diverged"
    assert reasons[3] == "objective reward/final is nan in the run's summary"
    assert [r["reason"] for r in read_csv(tmp_path / "trials.csv")] == [
        "", reasons[1], reasons[2], reasons[3], ""]
    assert all(t.user_attrs["run_dir"] == str(tmp_path / str(t.number)) for t in trials)
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())["best"]
    assert best["number"] in (0, 4) and best["values"] == {"reward/final": 0.5}


def test_max_failures_stops_the_sweep_and_still_writes_its_results(config_loader, tmp_path,
                                                                    caplog):
    launcher = ScriptedLauncher(
        {n: raises(Diverged(f"KL diverged in trial {n}")) for n in range(10)}, tmp_path)

    with pytest.raises(SweepStopped, match=r"stopped after 2 failed trials "
                                           r"\(hydra.sweeper.max_failures=2\)"):
        with caplog.at_level(logging.INFO, logger="klsweep.sweep"):
            sweep(config_loader, tmp_path, launcher, "hydra.sweeper.max_failures=2")

    assert launcher.numbers == [0, 1]
    assert by_state(study(tmp_path).trials) == {"FAIL": [0, 1]}
    assert len(read_csv(tmp_path / "trials.csv")) == 2
    assert "trial 1 FAIL · KL diverged in trial 1" in caplog.text


def test_a_batch_of_n_jobs_trials_is_launched_at_once_each_in_its_own_dir(config_loader,
                                                                        tmp_path):
    launcher = ScriptedLauncher({}, tmp_path)

    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=3",
          "hydra.sweeper.n_jobs=2")

    assert [(index, len(jobs)) for index, jobs in launcher.batches] == [(0, 2), (2, 1)]
    for number, job in enumerate(job for _, jobs in launcher.batches for job in jobs):
        assert job[:2] == ARGUMENTS  # the command line's fixed overrides, then the trial's
        assert {f"trial.number={number}", f"hydra.sweep.subdir={number}",
                "trial.study_name=beta_target"} <= set(job)
        assert {o.split("=")[0] for o in job} >= {"kl.beta", "kl.target", "trial.storage"}
    assert by_state(study(tmp_path).trials) == {"COMPLETE": [0, 1, 2]}


def test_a_storage_named_by_env_reaches_the_trials_as_that_name(config_loader, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("KLSWEEP_TEST_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    launcher = ScriptedLauncher({0: pruned}, tmp_path)

    sweep(config_loader, tmp_path, launcher, *SINGLE_OBJECTIVE, "hydra.sweeper.n_trials=1",
          "hydra.sweeper.storage=env:KLSWEEP_TEST_STORAGE")

    ((_, (job,)),) = launcher.batches
    assert "trial.storage=env:KLSWEEP_TEST_STORAGE" in job
    (trial,) = study(tmp_path).trials  # the run reported through the variable's URL
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {5: 0.25}
