"""The Launcher that Hydra instantiates for ``hydra/launcher: klsweep_local``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class KLSweepLocalLauncher(Launcher):
    """Runs each job in a process forked from this one, ``n_jobs`` at a time.

    A fork starts a job with everything this process has imported (torch, Lightning, the
    task): a trial begins training at once, where a fresh interpreter (joblib's workers,
    submitit) spends seconds importing. Each job still gets a process of its own, so one
    job's globals, signal handlers and crashes never reach another.

    Each job's start and end is told to ``job_events``, which a sweeper that reports its
    trials sets (klsweep_optuna); left None, the launcher prints a line per job itself."""

    def __init__(self, n_jobs: int | None = None, gpus: Sequence[int | str] | None = None,
                 trials_per_gpu: int = 1) -> None:
        self.requested_jobs = n_jobs
        self.gpus = gpus
        self.trials_per_gpu = trials_per_gpu
        self.n_jobs = 1
        self.slots: list[tuple[str, ...]] = []  # the GPU sets of the trials running at once
        self.prepared = False  # prepare_parent ran: once, not per batch of the sweep
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.job_events = None  # a sweeper's JobEvents (see _events)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra_plugins.klsweep_local._forked import default_jobs, gpu_count
        from hydra_plugins.klsweep_local._placement import (
            PlacementError,
            device_slots,
            gpus_per_trial,
            visible_gpu_ids,
        )

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        for key, value, null_ok in (("n_jobs", self.requested_jobs, True),
                                    ("trials_per_gpu", self.trials_per_gpu, False)):
            if (value is not None or not null_ok) and (isinstance(value, bool) or
                                                       not isinstance(value, int) or value < 1):
                _exit_with(f"hydra.launcher.{key} must be a whole number ≥ 1"
                           f"{' or null' if null_ok else ''} (got {value!r})")
        gpu_ids = ([str(gpu) for gpu in self.gpus] if self.gpus is not None
                   else visible_gpu_ids(gpu_count()))
        try:
            self.slots = device_slots(gpu_ids, gpus_per_trial(config, len(gpu_ids)),
                                      self.trials_per_gpu)
        except PlacementError as err:
            _exit_with(str(err))
        self.n_jobs = self.requested_jobs or default_jobs(config, self.slots)
        if self.slots and self.n_jobs > len(self.slots):
            log.info(f"hydra.launcher.n_jobs={self.n_jobs}: {len(self.slots)} trials at once, "
                     f"one per GPU slot (hydra.launcher.trials_per_gpu shares a GPU)")
            self.n_jobs = len(self.slots)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.klsweep_local._events import GridLines
        from hydra_plugins.klsweep_local._forked import prepare_parent, run_forked

        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        events = self.job_events
        if events is None:  # a sweeper that reports nothing itself: a line per job from here
            events = GridLines(self.config, len(job_overrides))
            at_once = min(self.n_jobs, len(job_overrides))
            varied = ", ".join(events.keys) or "nothing"
            log.info(f"klsweep: sweep {self.config.hydra.sweep.dir}: {len(job_overrides)} "
                     f"jobs, {at_once} at a time, each in a forked process; varied: {varied}")
        if self.slots:
            log.info(f"GPU slots: {' | '.join(','.join(slot) for slot in self.slots)}")
        if not self.prepared:
            prepare_parent(self.config)
            self.prepared = True
        return run_forked(job_overrides, initial_job_idx, n_jobs=self.n_jobs,
                          hydra_context=self.hydra_context, task_function=self.task_function,
                          config=self.config, events=events, slots=self.slots)


def _exit_with(message: str) -> None:
    """One line, before any job, as klsweep's other checks print it."""
    print(f"klsweep: error: {message}", file=sys.stderr)
    sys.exit(2)
