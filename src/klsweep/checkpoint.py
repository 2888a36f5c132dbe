"""Checkpoints, resuming, and stopping cleanly on SIGTERM or Ctrl-C.

A checkpoint holds exactly what the next step depends on: the tensors training changes (the
trainable parameters, so with LoRA the adapter only; the buffers of the trained modules; a
moving reference), the optimiser, the β schedule, the step count, the task's and the
algorithm's own state, and every rank's random state (Python, NumPy, torch CPU and CUDA, the
prompt stream's generator). The history is not in it: metrics.jsonl is the record, cut back to
the checkpoint's step on resume.

Why not Lightning's ModelCheckpoint with ``fit(ckpt_path=...)``: its checkpoint holds the whole
module state (a frozen reference as large as the policy), and its loops resume inside an epoch
only from a stateful data loader. A klsweep run is one epoch of an iterable prompt stream,
optimised by hand and counted by the module's own step, so this file saves that state itself,
under the names users know (``checkpoints/last.ckpt``, ``checkpoints/best.ckpt``) and with the
top-level keys of Lightning's format (``state_dict``, ``optimizer_states``, ``global_step``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from klsweep.errors import RunFailed, RunInterrupted
from klsweep.records import read_summary
from klsweep.schema import ConfigError

log = logging.getLogger("klsweep")

LAST, BEST = "last.ckpt", "best.ckpt"
# settings a resumed run may change: where and how it records, not what it computes
FREE_ON_RESUME = ("resume", "checkpoint.", "trial.", "logger.", "hydra.", "threads", "name",
                  "trainer.enable_progress_bar", "task.cache_dir")


class CheckpointError(RunFailed):
    """A checkpoint could not be written (disk full, run dir unwritable)."""


class ResumeError(ConfigError):
    """What ``resume`` points at cannot be resumed; nothing has been written."""


# --- random state ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global random state, as tensors and lists (loadable with ``weights_only``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"python": [version, list(mt), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# --- files ----------------------------------------------------------------------------------
def _reason(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def save_atomic(payload: Mapping[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` through a temporary file and ``os.replace``: a kill while
    writing leaves the previous checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # streamed to the file: no second copy in memory
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the last good one
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # no directory, no file: nothing to remove
            tmp.unlink(missing_ok=True)  # a partial file would hold the disk space it ran out of
        raise CheckpointError(f"cannot write the checkpoint {path}: {_reason(err)}; "
                              f"metrics.jsonl holds every step so far") from err


def link_atomic(source: Path, path: Path) -> None:
    """``path`` becomes the same file as ``source`` (best.ckpt: no second write)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"cannot write the checkpoint {path}: {_reason(err)}") from err


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ResumeError(f"resume: cannot read the checkpoint {path} ({_reason(err)}); "
                          f"resume=never starts the run over") from None


# --- what to resume -------------------------------------------------------------------------
def _flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved settings that decide a run's numbers, flattened (``kl.beta``: 0.05)."""
    return {key: value for key, value in _flat(config).items()
            if not key.startswith(FREE_ON_RESUME)}


def _check_same_run(saved: Mapping[str, Any], now: Mapping[str, Any], where: Path) -> None:
    changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    if changed:
        shown = ", ".join(f"{key}={saved.get(key)!r}, not {now.get(key)!r}"
                          for key in changed[:3])
        raise ResumeError(f"resume: {where} holds a run with other settings ({shown}); "
                          f"resume=never starts it over, or use another hydra.run.dir")


@dataclass
class Resume:
    """What a run starts from: nothing (a fresh run), a checkpoint of an unfinished run, or
    the summary of a run that completed (nothing to train)."""

    checkpoint: dict[str, Any] | None = None
    source: Path | None = None        # the run dir the checkpoint belongs to
    completed: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint["global_step"]


def plan_resume(setting: str, run_dir: Path, settings: Mapping[str, Any]) -> Resume:
    """``resume=auto``: continue ``run_dir``'s own run if it left a checkpoint and did not
    complete; ``never``: start over; a run dir or a .ckpt file: continue that one."""
    if setting == "never":
        return Resume()
    if setting == "auto":
        source, path = run_dir, run_dir / "checkpoints" / LAST
    else:
        given = Path(setting).expanduser()
        if given.is_file():
            source, path = given.resolve().parent.parent, given
        else:
            source, path = given, given / "checkpoints" / LAST
            if not path.is_file():
                raise ResumeError(f"resume={setting}: no checkpoint at {path}")
    summary = read_summary(source / "summary.json")
    checkpoint = load_checkpoint(path) if path.is_file() else None
    if checkpoint is not None:
        _check_same_run(checkpoint["klsweep"]["settings"], settings, source)
    if summary is not None and summary.get("status") == "completed":
        return Resume(completed=summary, source=source)
    return Resume(checkpoint=checkpoint, source=source if checkpoint else None)


# --- stopping cleanly -----------------------------------------------------------------------
class GracefulStop:
    """SIGTERM (a scheduler's preemption or requeue), SIGUSR2 (Slurm's warning that the time
    limit is near, which submitit asks for with ``--signal=USR2@N``) and Ctrl-C end the run at
    the end of the current step, with a checkpoint; a second Ctrl-C stops at once. Restores
    the handlers it found."""

    # SIGUSR2's default action ends the process with no checkpoint at all (Windows has none)
    SIGNALS = (signal.SIGTERM, signal.SIGINT,
               *((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()))

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals reach it alone
            self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: Lightning puts its own SIGTERM handler in at fit start,
        which would end the run after the step without a checkpoint."""
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
        log.warning(f"klsweep: {self.signal_name}: stopping after this step, with a "
                    f"checkpoint{again}")

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def any_rank(trainer: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank must take the same branch)."""
    if trainer.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _gathered(trainer: Any, obj: Any) -> list[Any]:
    if trainer.world_size == 1:
        return [obj]
    out: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class RunCheckpoint(Callback):
    """Saves ``checkpoints/last.ckpt`` every ``every`` steps, at the last step and when a
    signal stops the run; ``best.ckpt`` is the saved state with the highest reward/mean."""

    def __init__(self, run_dir: Path, every: int, stop: GracefulStop,
                 meta: Mapping[str, Any], resume: Resume) -> None:
        self.dir, self.every, self.stop, self.meta = run_dir / "checkpoints", every, stop, meta
        saved = resume.checkpoint["klsweep"] if resume.checkpoint else {}
        self.best = saved.get("best_reward", -math.inf)
        self.save_s: list[float] = []

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.stop.install()

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        step = module.step_count
        stopping = any_rank(trainer, self.stop.signal_name is not None
                             or trainer.received_sigterm)
        if stopping or step % self.every == 0 or step == module.steps:
            self.save(trainer, module)
        if stopping:
            name = self.stop.signal_name or "SIGTERM"
            raise RunInterrupted(f"interrupted by {name} after step {step}; the same command "
                                 f"resumes it", getattr(signal, name))

    def save(self, trainer: Any, module: Any) -> None:
        started = time.perf_counter()
        ranks = _gathered(trainer, module.rank_state())
        payload = module.checkpoint_state()
        error: CheckpointError | None = None
        if trainer.is_global_zero:
            try:
                self._write(module, payload, ranks)
            except CheckpointError as err:
                error = err
        if any_rank(trainer, error is not None):
            raise error or CheckpointError("rank 0 could not write the checkpoint")
        self.save_s.append(time.perf_counter() - started)

    def _write(self, module: Any, payload: dict[str, Any], ranks: list[Any]) -> None:
        reward = module.history[-1].get("reward/mean", -math.inf) if module.history else -math.inf
        better = reward > self.best
        payload["klsweep"].update(self.meta, ranks=ranks, best_reward=max(self.best, reward))
        save_atomic(payload, self.dir / LAST)
        if better:
            link_atomic(self.dir / LAST, self.dir / BEST)
            self.best = reward

    def timing(self) -> dict[str, float]:
        """How many saves this invocation made and their mean time (summary.json)."""
        if not self.save_s:
            return {}
        return {"checkpoint/saves": len(self.save_s),
                "checkpoint/save_ms": 1000 * sum(self.save_s) / len(self.save_s)}
