"""The sweep loop: check everything, open (or resume) the study, then ask a batch of trials,
launch it, tell each trial its result, until the study holds ``n_trials`` COMPLETE or PRUNED
trials; finally write trials.csv and best.yaml / pareto.yaml and print the best trials.

The console shows a line per trial that starts and ends (with its objectives, or why it failed
or was pruned) and the study's progress after each end; with klsweep_local each as it happens,
with another launcher as the batch is launched and as it returns."""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import Trial, TrialState

from hydra_plugins.klsweep_optuna import _results
from hydra_plugins.klsweep_optuna._checks import (
    check_numbers,
    check_objectives,
    check_params,
    finite_values,
    known_objectives,
)
from hydra_plugins.klsweep_optuna._constraints import check_constraints
from hydra_plugins.klsweep_optuna._errors import SweepConfigError, SweepStopped
from hydra_plugins.klsweep_optuna._search_space import (
    SearchSpace,
    override_string,
    parse_search_space,
)
from hydra_plugins.klsweep_optuna._storage import StorageURL, study_storage
from hydra_plugins.klsweep_optuna._study import (
    CLAIMED,
    DONE,
    Heartbeat,
    check_pruner,
    count,
    fail_stale_trials,
    grid_space,
    is_surplus,
    make_sampler,
    make_storage,
    trial_id,
)
from klsweep.budget import constraint_values
from klsweep.pruning import SWEEP_ATTR, make_pruner
from klsweep.swept import SweepClock, event_line, failure_reason

log = logging.getLogger("klsweep.sweep")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial


class OptunaSweep:
    def __init__(self, settings: DictConfig, config: DictConfig, hydra_context: HydraContext,
                 launcher: Any) -> None:
        self.settings, self.config, self.launcher = settings, config, launcher
        self.config_loader = hydra_context.config_loader
        self.job_index = 0
        self.trial_ids: dict[int, int] = {}  # trial number -> the storage's trial id
        self.launched: dict[int, Trial] = {}  # Hydra's job index -> the trial it runs, till it ends
        self.failures = 0
        self.interrupted: list[int] = []  # trials stopped by SIGTERM or Ctrl-C: queued again
        self.clock = SweepClock()
        if hasattr(launcher, "job_events"):  # klsweep_local: each job as it starts and ends
            launcher.job_events = self

    # --- before any trial ---------------------------------------------------------------
    def plan(self, arguments: Sequence[str]) -> None:
        """Parse and check every setting; raise SweepConfigError with one line if any is bad."""
        s = self.settings
        check_numbers(s)
        parser = OverridesParser.create(config_loader=self.config_loader)
        params = OmegaConf.to_container(s.params, resolve=True)
        self.space: SearchSpace = parse_search_space(params, arguments, parser)
        task = OmegaConf.select(self.config, "task.name")
        self.objectives = check_objectives(OmegaConf.to_container(s.objectives, resolve=True),
                                           task=task, config=self.config)
        self.constraints = check_constraints(
            OmegaConf.to_container(s.constraints, resolve=True),
            known_objectives(task, self.config))
        n_objectives = len(self.objectives)
        self.pruner = check_pruner(OmegaConf.to_container(s.pruner, resolve=True), n_objectives)
        self.sampler_spec = OmegaConf.to_container(s.sampler, resolve=True)
        self.sampler = make_sampler(self.sampler_spec, self.space.distributions, n_objectives)
        self.grid = (list(itertools.product(*grid_space(self.space.distributions).values()))
                     if self.sampler_spec["name"] == "grid" else None)
        check_params(self.space, self.config, self.config_loader)
        self.n_trials = s.n_trials if self.grid is None else min(s.n_trials, len(self.grid))
        self.max_failures = s.max_failures or s.n_trials
        # klsweep_local's n_jobs, resolved; submitit_slurm's array_parallelism
        at_once = getattr(self.launcher, "n_jobs", None)
        self.batch_size = s.n_jobs or (at_once if isinstance(at_once, int) and at_once > 0 else 1)
        self.sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        self.storage_url: StorageURL = study_storage(
            s.storage, sweep_dir=self.sweep_dir,
            interpolated=OmegaConf.is_interpolation(self.config.hydra.sweeper, "storage"))

    def open_study(self) -> optuna.Study:
        """Create the study, or load it to resume: the same command and objectives only."""
        s = self.settings
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.study_name = s.study_name or self.sweep_dir.name
        self.storage = make_storage(self.storage_url.url, heartbeat_interval=s.heartbeat_interval,
                                    grace_period=s.grace_period, max_retry=s.max_retry)
        study = optuna.create_study(
            storage=self.storage, study_name=self.study_name, sampler=self.sampler,
            pruner=make_pruner(self.pruner), directions=list(self.objectives.values()),
            load_if_exists=True)
        before = study.user_attrs.get(SWEEP_ATTR)
        where = f"study {self.study_name} in {self.storage_url.shown}"
        if before and before["objectives"] != self.objectives:
            raise SweepConfigError(f"{where} has objectives {before['objectives']}, not "
                                   f"{self.objectives}: set hydra.sweeper.study_name for a "
                                   f"new study")
        constraints = [vars(c) for c in self.constraints]
        if before and before.get("constraints", []) != constraints:
            raise SweepConfigError(f"{where} was run with constraints "
                                   f"{before.get('constraints', [])}, not {constraints}: set "
                                   f"hydra.sweeper.study_name for a new study")
        if before and sorted(before["overrides"]) != sorted(self.space.fixed):
            raise SweepConfigError(f"{where} was run with {' '.join(before['overrides'])!r}, "
                                   f"not {' '.join(self.space.fixed)!r}: resume it with the "
                                   f"same overrides or set hydra.sweeper.study_name")
        held = len(study.get_trials(deepcopy=False))
        if held and self.sampler_spec.get("seed") is not None:
            # a seeded sampler made anew would replay the first run's draws: a resumed study
            # moves its seed on by the trials it holds (workers sharing a study at once
            # should leave the seed null, or they draw alike)
            study.sampler = make_sampler({**self.sampler_spec,
                                          "seed": self.sampler_spec["seed"] + held},
                                         self.space.distributions, len(self.objectives))
        study.set_user_attr(SWEEP_ATTR, {
            "objectives": self.objectives, "overrides": list(self.space.fixed),
            "params": {key: str(dist) for key, dist in self.space.distributions.items()},
            "pruner": self.pruner, "report_every": s.report_every, "constraints": constraints,
            "budget_pruning": OmegaConf.to_container(s.budget_pruning, resolve=True)})
        return study

    # --- the loop -------------------------------------------------------------------------
    def run(self, arguments: Sequence[str]) -> list[Sequence[JobReturn]]:
        self.plan(arguments)
        study = self.study = self.open_study()
        log.info(f"klsweep: study {self.study_name} ({self.storage_url.shown}): "
                 f"{self.trials_done(study)} of {self.n_trials} trials done; searching "
                 f"{', '.join(self.space.distributions) or 'nothing'}; objectives "
                 f"{', '.join(f'{k} ({v})' for k, v in self.objectives.items())}")
        returns: list[Sequence[JobReturn]] = []
        while self.failures < self.max_failures and not self.interrupted:
            fail_stale_trials(study)
            if count(study, DONE) >= self.n_trials or self.grid_finished(study):
                break
            wanted = min(self.batch_size, self.n_trials - count(study, CLAIMED))
            if wanted <= 0:
                log.info("klsweep: waiting for the trials other workers are running")
                time.sleep(self.settings.heartbeat_interval)
                continue
            batch = self.claim(study, [self.ask(study) for _ in range(wanted)])
            if not batch:
                continue
            returns.append(self.launch(batch))
        self.write_results(study)
        if self.interrupted:
            raise SweepStopped(f"klsweep: sweep interrupted (trial "
                               f"{', '.join(map(str, self.interrupted))} stopped with a "
                               f"checkpoint); the same command resumes it")
        if self.failures >= self.max_failures:
            raise SweepStopped(f"klsweep: sweep stopped after {self.failures} failed trials "
                               f"(hydra.sweeper.max_failures={self.max_failures}); see "
                               f"{self.sweep_dir / 'trials.csv'}")
        return returns

    def trials_done(self, study: optuna.Study) -> int:
        """The trials that count toward n_trials: COMPLETE and PRUNED ones; in a grid, the
        points that have a finished trial."""
        return count(study, DONE) if self.grid is None else self.points_done(study)

    def grid_finished(self, study: optuna.Study) -> bool:
        return self.grid is not None and self.points_done(study) == len(self.grid)

    def points_done(self, study: optuna.Study) -> int:
        """The grid's points that have a finished trial, failed ones included: the grid
        sampler does not draw a point twice, so a grid is done once every point is."""
        keys = list(self.space.distributions)
        finished = {tuple(t.params.get(k) for k in keys) for t in study.get_trials(
            deepcopy=False, states=(*DONE, TrialState.FAIL))}
        return sum(point in finished for point in self.grid or ())

    def ask(self, study: optuna.Study) -> Trial:
        with warnings.catch_warnings():
            # Optuna expects heartbeats from study.optimize; this loop records them itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask(self.space.distributions)
        # a first heartbeat at once: a RUNNING trial that never had one is never found stale
        self.trial_ids[trial.number] = trial_id(self.storage, self.study_name, trial.number)
        self.storage.record_heartbeat(self.trial_ids[trial.number])
        return trial

    def claim(self, study: optuna.Study, trials: list[Trial]) -> list[Trial]:
        """The asked trials this worker runs; one that another worker's trials made surplus
        (asked at the same moment past n_trials) is closed at once as FAIL."""
        batch = []
        for trial in trials:
            if is_surplus(study, trial.number, self.n_trials):
                trial.set_user_attr("reason", f"surplus: the study reached n_trials="
                                              f"{self.n_trials} while this trial was asked")
                study.tell(trial, state=TrialState.FAIL)
            else:
                batch.append(trial)
        return batch

    def run_dir_number(self, trial: Trial) -> int:
        """The number a trial's run dir is named by: its own, or for a re-run of a trial
        whose worker died or that was interrupted, the first run's, so that the run resumes
        from the checkpoint it left there (resume=auto)."""
        attrs = self.storage.get_trial_system_attrs(self.trial_ids[trial.number])
        return attrs.get("failed_trial", trial.number)

    def requeue(self, study: optuna.Study, trial: Trial) -> None:
        """Queue an interrupted trial again with its params, as Optuna re-queues a stale one;
        an interruption is not a failure, so there is no limit on how often, and it is kept
        out of ``retry_history``, which counts the dead workers' retries against max_retry."""
        frozen = self.storage.get_trial(self.trial_ids[trial.number])
        interrupted = [*frozen.system_attrs.get("interrupted_trials", []), trial.number]
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            system_attrs={**frozen.system_attrs, "interrupted_trials": interrupted,
                          "failed_trial": frozen.system_attrs.get("failed_trial", trial.number)}))

    def launch(self, batch: list[Trial]) -> Sequence[JobReturn]:
        jobs = [[*self.space.fixed,
                 *(override_string(key, value) for key, value in trial.params.items()),
                 override_string("trial.storage", self.storage_url.for_trials),
                 override_string("trial.study_name", self.study_name),
                 f"trial.number={trial.number}",
                 # one dir per trial, named by its number, so a resumed study adds dirs
                 f"hydra.sweep.subdir={self.run_dir_number(trial)}"]
                for trial in batch]
        ids = [self.trial_ids[trial.number] for trial in batch]
        self.launched = {self.job_index + i: trial for i, trial in enumerate(batch)}
        os.environ.update(self.storage_url.trial_env)  # before any launcher starts a process
        if not hasattr(self.launcher, "job_events"):  # a launcher that reports nothing
            for idx, job in zip(self.launched, jobs, strict=True):
                self.started(idx, job)
        with Heartbeat(self.storage, ids, self.settings.heartbeat_interval):
            results = self.launcher.launch(jobs, initial_job_idx=self.job_index)
        indices = range(self.job_index, self.job_index + len(jobs))
        for idx, job, result in zip(indices, jobs, results, strict=True):
            if idx in self.launched:  # not told yet: the launcher returned it only now
                self.finished(idx, job, result)
        self.job_index += len(jobs)
        return results

    # --- each trial as it starts and ends (klsweep_local's JobEvents) -----------------------
    def started(self, idx: int, overrides: Sequence[str]) -> None:
        trial = self.launched[idx]
        log.info(event_line("trial", trial.number, "started", values=trial.params))

    def finished(self, idx: int, overrides: Sequence[str], result: JobReturn) -> None:
        """Tell the study what the trial's run returned, queue an interrupted trial again, and
        show the study's progress."""
        trial = self.launched.pop(idx)
        self.clock.job_ended()
        if self.tell(self.study, trial, result) == TrialState.FAIL:
            if getattr(result._return_value, "status", None) == "interrupted":
                self.requeue(self.study, trial)
                self.interrupted.append(trial.number)
            else:
                self.failures += 1
        counts = {state.name: count(self.study, (state,))
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        log.info(f"klsweep: study {self.study_name}: " + self.clock.progress(
            self.trials_done(self.study), self.n_trials, len(self.launched), counts, "trials"))

    def tell(self, study: optuna.Study, trial: Trial, result: JobReturn) -> TrialState:
        """Record what the run returned: its objectives, PRUNED, or FAIL with the reason."""
        if result.hydra_cfg is not None:
            trial.set_user_attr("run_dir", str(result.hydra_cfg.hydra.runtime.output_dir))
        values, reason = None, None
        if result.status == JobStatus.COMPLETED:
            values, reason = finite_values(result.return_value, list(self.objectives))
            constraints, broken = constraint_values(self.constraints, result.return_value)
            if values is not None and constraints is None:
                values, reason = None, broken
            for name, value in (constraints or {}).items():
                trial.set_constraint(name, value)
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        else:
            error = result._return_value  # the exception the run raised
            pruned = isinstance(error, optuna.TrialPruned)
            state = TrialState.PRUNED if pruned else TrialState.FAIL
            reason = failure_reason(error)
            trial.set_user_attr("status", getattr(error, "status", state.name.lower()))
        if reason is not None:
            trial.set_user_attr("reason", reason)
        study.tell(trial, values=values, state=state)
        shown = reason if values is None else " ".join(
            f"{k}={v:.4g}" for k, v in zip(self.objectives, values, strict=True))
        if values is not None and self.constraints:
            shown += " infeasible" if any(v > 0 for v in constraints.values()) else " feasible"
        log.info(event_line("trial", trial.number, state.name, shown, trial.params))
        return state

    # --- after the loop ---------------------------------------------------------------------
    def write_results(self, study: optuna.Study) -> None:
        names = [c.name for c in self.constraints]
        _results.write_trials_csv(self.sweep_dir / "trials.csv", study, list(self.objectives),
                                  names)
        path = _results.write_best(self.sweep_dir, study, self.objectives, self.space.fixed,
                                   self.storage_url.shown, names)
        best = _results.best_trials(study)
        least = _results.least_infeasible(study) if names and not best else None
        states = {state.name: count(study, (state,)) for state in TrialState
                  if count(study, (state,))}
        title = "Pareto front" if len(self.objectives) > 1 else "best trial"
        if names:
            title = f"{title} subject to {', '.join(names)}"
        log.info(f"klsweep: study {self.study_name}: "
                 f"{', '.join(f'{n} {name}' for name, n in states.items())}; {title} "
                 f"({path.name}):\n"
                 + (_results.format_table(best, list(self.objectives), names) if best
                    else "(no feasible trial; the least infeasible:)\n" + _results.format_table(
                        [least], list(self.objectives), names) if least is not None
                    else "(no trial completed)"))
        log.info(f"klsweep: trials in {self.sweep_dir / 'trials.csv'}; "
                 f"optuna-dashboard {self.storage_url.shown}")
