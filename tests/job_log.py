"""A Hydra callback for the launcher tests, run inside each job's own process by whichever
launcher ran it: it records the job's process, how many jobs were running as it started, and
makes the jobs of one batch meet, so that the tests see what a launcher guarantees (each job in
its own process, ``n`` at once and no more) without reading clocks.

    +hydra.callbacks.log._target_=tests.job_log.JobLog +hydra.callbacks.log.directory=DIR
    +hydra.callbacks.log.batch=2

Under ``DIR``: ``sweep_pid`` (the sweep's process), ``jobs/<num>`` (``pid running met`` of
job ``num``) and ``running/<pid>`` while a job runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RENDEZVOUS_S = 300  # how long a job waits for the rest of its batch: a launcher that runs
# the jobs one after another never gets there, and a loaded machine starts a process in less


class JobLog(Callback):
    def __init__(self, directory: str, batch: int) -> None:
        self.directory, self.batch = Path(directory), batch

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for sub in ("jobs", "running", "started"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "sweep_pid").write_text(str(os.getpid()))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        num, pid = config.hydra.job.num, os.getpid()
        (self.directory / "running" / str(pid)).touch()
        running = len(list((self.directory / "running").iterdir()))
        (self.directory / "started" / str(num)).touch()
        first = num - num % self.batch
        batch = [self.directory / "started" / str(n) for n in range(first, first + self.batch)]
        deadline = time.monotonic() + RENDEZVOUS_S
        while not (met := all(path.exists() for path in batch)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.directory / "jobs" / str(num)).write_text(f"{pid} {running} {int(met)}")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        (self.directory / "running" / str(os.getpid())).unlink()


def read_job_log(directory: Path) -> tuple[int, dict[int, tuple[int, int, bool]]]:
    """The sweep's pid, and per job number: its pid, the jobs running as it started (itself
    included) and whether it met the rest of its batch while running."""
    jobs = {}
    for path in (directory / "jobs").iterdir():
        pid, running, met = map(int, path.read_text().split())
        jobs[int(path.name)] = (pid, running, bool(met))
    return int((directory / "sweep_pid").read_text()), jobs
