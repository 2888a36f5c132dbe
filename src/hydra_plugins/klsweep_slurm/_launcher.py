"""The Launcher: hydra-submitit-launcher's SlurmLauncher with klsweep's checks before the first
job, a wait that reads Slurm's record of every job, and, in a trial's job, what follows when
Slurm stopped its run."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf

from klsweep.errors import RunInterrupted

log = logging.getLogger(__name__)

# settings of hydra.launcher that name the executor rather than its jobs
_EXECUTOR_KEYS = ("submitit_folder", "max_num_timeout")


class KLSweepSlurmLauncher(SlurmLauncher):
    """Each batch of trials is one Slurm job array, ``array_parallelism`` of its jobs at once;
    each job runs one trial in a fresh Python process under ``srun``
    (``python -m submitit.core._submit``), which loads this object and calls it."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # the Optuna sweeper asks this many trials a batch unless hydra.sweeper.n_jobs is set
        self.n_jobs = int(self.params["array_parallelism"])

    # --- in the sweep's process -----------------------------------------------------------
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra_plugins.klsweep_slurm._checks import SlurmConfigError, check_before_jobs

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        try:
            check_before_jobs(self.params, config, self._executor)
        except SlurmConfigError as err:  # one line, before the study opens, as klsweep's checks
            print(f"klsweep: error: {err}", file=sys.stderr)
            sys.exit(2)

    def _executor(self) -> Any:
        """submitit's Slurm executor with every setting of ``hydra.launcher`` (as
        hydra-submitit-launcher passes them)."""
        import submitit

        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params["max_num_timeout"])
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"slurm_{key}": value
                                      for key, value in self.params.items()
                                      if key not in _EXECUTOR_KEYS})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.klsweep_slurm._watch import Trial, submit_failed, wait_for_results

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        trials, job_params = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            trials.append(Trial(list(overrides), sweep_dir / _subdir(overrides, idx)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                               Singleton.get_state()))
        try:
            jobs = self._executor().map_array(self, *zip(*job_params, strict=True))
        except Exception as err:  # sbatch refused (a limit reached, the controller down)
            return submit_failed(trials, err)
        at_once = min(len(jobs), self.n_jobs)
        log.info(f"Slurm job {jobs[0].job_id.split('_')[0]}: {len(jobs)} trial"
                 f"{'s' if len(jobs) > 1 else ''}, {at_once} at a time "
                 f"(logs in {jobs[0].paths.folder})")
        return wait_for_results(jobs, trials)

    # --- in a trial's Slurm job -------------------------------------------------------------
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict[type, Singleton]) -> JobReturn:
        result = super().__call__(sweep_overrides, job_dir_key, job_num, job_id,
                                  singleton_state)
        error = result._return_value if result.status == JobStatus.FAILED else None
        if isinstance(error, RunInterrupted):
            after_slurm_stopped_the_run(error)
        return result


def after_slurm_stopped_the_run(error: RunInterrupted) -> None:
    """In a trial's job, after a signal stopped its run at the end of a step, with a checkpoint.
    SIGUSR2, Slurm's warning that the time limit is near: submitit's own handler, which the run
    restored, checkpoints this call (the same run again: it resumes from its checkpoint) and
    requeues the job, or with no requeue left (``max_num_timeout``) ends it with that reason.
    SIGTERM (a requeue, a preemption, scancel): the job leaves no result, and the sweep reads
    from Slurm what follows: a requeued job runs the trial again, a cancelled one fails it."""
    signum = error.exit_code - 128
    if signum == getattr(signal, "SIGUSR2", None):
        handler = signal.getsignal(signal.SIGUSR2)
        if callable(handler):
            handler(signal.SIGUSR2, None)  # exits, or raises why it did not requeue
    elif signum == signal.SIGTERM:
        log.warning("klsweep: Slurm stopped this job (a requeue, a preemption or scancel): it "
                    "leaves no result; a requeued job resumes the run from its checkpoint")
        sys.exit(error.exit_code)


def _subdir(overrides: Sequence[str], job_num: int) -> str:
    """The run dir of a job under the sweep dir: klsweep's sweeper names it by the trial
    (``hydra.sweep.subdir``); Hydra's default is the job's number."""
    for override in overrides:
        if override.startswith("hydra.sweep.subdir="):
            return override.split("=", 1)[1]
    return str(job_num)
