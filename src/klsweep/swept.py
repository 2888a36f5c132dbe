"""What a sweep varies, and how its jobs show it: the keys a multirun sweeps, each job's values
of them, the job's run name and W&B tags, and the sweep console's one line per job event.

The swept keys are read as Hydra's sweepers read them: ``hydra.sweeper.params`` first, then the
command line, where a sweep value (``a=1,2``, ``choice(...)``, ``interval(...)``, ``range(...)``)
sweeps its key and a plain value fixes it for every job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna import TrialPruned

# W&B refuses a tag longer than this (wandb.sdk.wandb_settings)
MAX_TAG = 64
# what a job's line shows of a completed run without objectives (a grid): its headline numbers
HEADLINE = ("reward/final", "kl/final")


@dataclass(frozen=True)
class SweepJob:
    """A job of a multirun: its W&B group (the sweep dir's name) and its values of the keys
    the sweep varies, in the sweep's order."""

    group: str
    values: dict[str, Any] = field(default_factory=dict)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) pairs: ``params.kl.beta=...`` on the command line nests ``beta``
    under ``kl``, while a YAML preset writes the key ``kl.beta`` whole; both mean kl.beta."""
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_params(value, prefix=f"{full}.")
        else:
            yield full, value


def swept_keys(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> list[str]:
    """The keys a sweep varies, in order: those of ``hydra.sweeper.params`` whose value is a
    sweep, then the command line's sweep overrides; a plain value on the command line fixes
    its key."""
    parser = OverridesParser.create()
    swept: dict[str, None] = {}
    lines = [f"{key}={value}" for key, value in flatten_params(params or {})
             if isinstance(value, str)]  # a number or a bool in params is a fixed value
    for override in parser.parse_overrides([*lines, *arguments]):
        if override.is_sweep_override():
            swept[override.key_or_group] = None
        else:
            swept.pop(override.key_or_group, None)
    return list(swept)


def sweep_keys_of(hydra_cfg: DictConfig) -> list[str]:
    """The keys a sweep varies, read from its Hydra config (``hydra``: the sweep's own, as
    multirun.yaml holds it, not a job's)."""
    params = hydra_cfg.sweeper.get("params")
    params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else {}
    return swept_keys(params, list(hydra_cfg.overrides.task))


def swept_values(job_overrides: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """A job's value of each swept key, as its overrides set it, in the order of ``keys``."""
    given = {o.key_or_group: o.value()
             for o in OverridesParser.create().parse_overrides(list(job_overrides))}
    return {key: given[key] for key in keys if key in given}


def sweep_job(hydra_cfg: DictConfig) -> SweepJob:
    """The sweep a running multirun job belongs to (``hydra_cfg``: its HydraConfig). Its
    overrides hold every value, fixed and swept alike; which keys were swept is read from
    ``multirun.yaml``, the sweep's own config, which Hydra's sweepers (and klsweep's) save in
    the sweep dir before the first job starts."""
    sweep_dir = Path(hydra_cfg.sweep.dir)
    saved = sweep_dir / "multirun.yaml"
    keys = sweep_keys_of(OmegaConf.load(saved).hydra) if saved.is_file() else []
    return SweepJob(group=sweep_dir.name,
                    values=swept_values(list(hydra_cfg.overrides.task), keys))


# --- how a job shows its values -------------------------------------------------------------
def shown(value: Any) -> str:
    """A swept value as a name or a console line shows it: floats to 4 significant digits."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def labels(keys: Iterable[str]) -> dict[str, str]:
    """A short label per key: its last part (``kl.beta`` → ``beta``), or the whole key where
    two keys would share one."""
    keys = list(keys)
    last = [key.rpartition(".")[2] for key in keys]
    return {key: short if last.count(short) == 1 else key
            for key, short in zip(keys, last, strict=True)}


def values_label(values: Mapping[str, Any]) -> str:
    """``divergence=js beta=0.1``: each value with its key's short label."""
    short = labels(values)
    return " ".join(f"{short[key]}={shown(value)}" for key, value in values.items())


def run_name(base: str, values: Mapping[str, Any], named: Iterable[str] = ()) -> str:
    """``base`` followed by the swept values that it does not show already (``named``)."""
    rest = {key: value for key, value in values.items() if key not in set(named)}
    return f"{base} {values_label(rest)}" if rest else base


def run_tags(values: Mapping[str, Any]) -> list[str]:
    """One W&B tag per swept value, ``key=value`` with the whole key (W&B's limit: 64
    characters)."""
    tags = [f"{key}={shown(value)}" for key, value in values.items()]
    return [tag if len(tag) <= MAX_TAG else tag[:MAX_TAG - 1] + "…" for tag in tags]


# --- the sweep console ----------------------------------------------------------------------
def event_line(kind: str, number: int, event: str, detail: str = "",
               values: Mapping[str, Any] | None = None) -> str:
    """``klsweep: trial 3 COMPLETE · exact/reward_final=0.503 · divergence=js beta=0.1``."""
    parts = [f"klsweep: {kind} {number} {event}", detail, values_label(values or {})]
    return " · ".join(part for part in parts if part)


def failure_reason(error: BaseException) -> str:
    """One line: klsweep's own errors (they carry a ``status``: diverged, interrupted) and the
    pruner's stop say what happened; any other exception is named by its type too."""
    own = hasattr(error, "status") or isinstance(error, TrialPruned)
    reason = str(error) if own else f"{type(error).__name__}: {error}"
    return reason.splitlines()[0] if reason.strip() else type(error).__name__


def job_outcome(result: JobReturn, objectives: Sequence[str] = HEADLINE) -> tuple[str, str]:
    """(how a job ended, what to show of it): ``completed`` and its objectives' values, or
    its status (failed, diverged, pruned, interrupted) and the reason."""
    if result.status == JobStatus.COMPLETED:
        summary = result.return_value if isinstance(result.return_value, Mapping) else {}
        return "completed", " ".join(f"{name}={shown(float(summary[name]))}" for name in objectives
                                     if isinstance(summary.get(name), (int, float)))
    error = result._return_value  # the exception the run raised
    status = getattr(error, "status", None) or (
        "pruned" if isinstance(error, TrialPruned) else "failed")
    return status, failure_reason(error)


class SweepClock:
    """Elapsed time and the time left of a sweep, from the jobs that ended since it started
    (a resumed study's earlier trials ran at another time)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ended = 0

    def job_ended(self) -> None:
        self.ended += 1

    def progress(self, done: int, total: int, running: int, counts: Mapping[str, int],
                 unit: str) -> str:
        """``3 of 15 trials done · 2 COMPLETE, 1 PRUNED, 1 FAIL · 2 running · 0:42 elapsed,
        about 2:40 left``: the time left is the jobs left at the rate they ended so far."""
        elapsed = time.monotonic() - self.started
        parts = [f"{done} of {total} {unit} done",
                 ", ".join(f"{n} {state}" for state, n in counts.items() if n),
                 f"{running} running", f"{clock(elapsed)} elapsed"]
        if self.ended and done < total:
            parts[-1] += f", about {clock(elapsed / self.ended * (total - done))} left"
        return " · ".join(part for part in parts if part)


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
