"""What the launcher says of its jobs as they start and end: a sweeper that reports them itself
answers ``JobEvents`` (klsweep_optuna: each trial with its objectives, and the study's
progress); for a Hydra sweeper that reports nothing (the basic sweeper's grid) the launcher
prints ``GridLines``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from hydra.core.utils import JobReturn
from omegaconf import DictConfig

from klsweep.swept import SweepClock, event_line, job_outcome, sweep_keys_of, swept_values

log = logging.getLogger("klsweep.sweep")


class JobEvents(Protocol):
    def started(self, idx: int, overrides: Sequence[str]) -> None:
        """Job ``idx`` (Hydra's job index) is running."""

    def finished(self, idx: int, overrides: Sequence[str], result: JobReturn) -> None:
        """Job ``idx`` ended with ``result``."""


class GridLines:
    """A line per job that starts and ends, with the values of the keys the sweep varies, and
    the sweep's progress after each end."""

    def __init__(self, config: DictConfig, total: int) -> None:
        self.keys = sweep_keys_of(config.hydra)
        self.name = str(config.hydra.sweep.dir)
        self.total, self.running, self.clock = total, 0, SweepClock()
        self.counts: dict[str, int] = {}

    def started(self, idx: int, overrides: Sequence[str]) -> None:
        self.running += 1
        log.info(event_line("job", idx, "started", values=swept_values(overrides, self.keys)))

    def finished(self, idx: int, overrides: Sequence[str], result: JobReturn) -> None:
        self.running -= 1
        self.clock.job_ended()
        event, detail = job_outcome(result)
        self.counts[event] = self.counts.get(event, 0) + 1
        log.info(event_line("job", idx, event, detail, swept_values(overrides, self.keys)))
        counts = dict(sorted(self.counts.items(), key=lambda item: item[0] != "completed"))
        log.info(f"klsweep: sweep {self.name}: " + self.clock.progress(
            sum(counts.values()), self.total, self.running, counts, "jobs"))
