"""Jobs in forked processes: at most ``n_jobs`` at once, each job's JobReturn sent back over
a pipe; a job whose process dies returns a failure naming how it died."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import pickle
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, run_job
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from hydra_plugins.klsweep_local._events import JobEvents
from hydra_plugins.klsweep_local._placement import DeviceSlot
from klsweep.errors import RunInterrupted
from klsweep.train import prepare_to_fork

# POSIX fork: the job starts from this process's memory, imports done (not available on Windows)
_FORK = multiprocessing.get_context("fork")


class LauncherConfigError(CompactHydraException):
    def __init__(self, message: str) -> None:
        super().__init__(f"klsweep: error: {message}")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as a scheduler's allocation sets
    it), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(config: DictConfig, slots: Sequence[DeviceSlot]) -> int:
    """Jobs at once when ``n_jobs`` is null: one per GPU slot for runs that use GPUs, else one
    per ``threads`` usable cores."""
    if slots:
        return len(slots)
    threads = config.get("threads")
    return max(1, usable_cores() // threads) if threads else 1


def gpu_count() -> int:
    # device_count asks NVML first and leaves CUDA uninitialised: the children forked later
    # can still use CUDA, which they could not once this process had initialised it
    import torch

    return torch.cuda.device_count()


def prepare_parent(config: DictConfig) -> None:
    """Once, before the first fork: load what every job would load for itself, and freeze it."""
    import torch

    if torch.cuda.is_initialized():  # a forked child cannot use CUDA after its parent did
        raise LauncherConfigError("hydra/launcher=klsweep_local forks its jobs, and this "
                                  "process has initialised CUDA; use hydra/launcher=basic")
    prepare_to_fork(config)
    # Python's advice for fork without exec: what exists now lives as long as this process,
    # and a frozen object is neither scanned by a collection nor written to by one, so the
    # children's collections skip it and leave its pages shared (and exit skips the 0.5 s
    # collection of everything imported)
    gc.freeze()


def run_forked(job_overrides: Sequence[Sequence[str]], initial_job_idx: int, *, n_jobs: int,
               hydra_context: HydraContext, task_function: TaskFunction,
               config: DictConfig, events: JobEvents,
               slots: Sequence[DeviceSlot] = ()) -> list[JobReturn]:
    """Run every job, ``n_jobs`` at once; the results in the jobs' order, each also told to
    ``events`` as the job ends (and its start as it starts). With GPU ``slots`` (at least
    ``n_jobs`` of them) each job runs on a free slot's GPUs, its only visible ones.

    SIGTERM sent to this process is passed on to the running jobs (each stops after its step
    with a checkpoint, as a run does); Ctrl-C reaches them from the terminal by itself. After
    either, no further job starts: those return as interrupted, for the sweep to run again."""
    pending = deque(enumerate(job_overrides, start=initial_job_idx))
    running: dict[Connection, tuple[int, Sequence[str], Any, DeviceSlot | None]] = {}
    free = deque(slots)
    results: dict[int, JobReturn] = {}
    with _stop_signals(lambda: [process for _, _, process, _ in running.values()]) as stopped:
        while pending or running:
            while pending and len(running) < n_jobs and not stopped:
                idx, overrides = pending.popleft()
                slot = free.popleft() if slots else None
                reader, writer = _FORK.Pipe(duplex=False)
                process = _FORK.Process(target=_job, name=f"klsweep-job-{idx}", args=(
                    writer, os.getpid(), idx, overrides, hydra_context, task_function, config,
                    slot))
                process.start()
                writer.close()  # the child holds the only writer: its exit ends the pipe
                running[reader] = (idx, overrides, process, slot)
                events.started(idx, overrides)
            if stopped and pending:
                for idx, overrides in pending:
                    results[idx] = _not_started(overrides, stopped[0])
                pending.clear()
            if not running:  # wait() on nothing would block for ever
                break
            for reader in wait(list(running)):
                idx, overrides, process, slot = running.pop(reader)
                results[idx] = _receive(reader, process, overrides)
                if slot is not None:
                    free.append(slot)
                events.finished(idx, overrides, results[idx])
    return [results[idx] for idx in sorted(results)]


# the handlers in effect before the launch: a child restores them, as if never forked mid-launch
_PREVIOUS_HANDLERS: dict[int, Any] = {}


@contextmanager
def _stop_signals(children: Callable[[], list[Any]]):
    """While jobs run: note SIGINT and SIGTERM in the list yielded (signal numbers), and pass
    SIGTERM on to the running children, instead of dying and leaving them orphaned."""
    stopped: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        stopped.append(signum)
        if signum == signal.SIGTERM:
            for process in children():
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _PREVIOUS_HANDLERS.update(previous)
    try:
        yield stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _PREVIOUS_HANDLERS.clear()


def _job(writer: Connection, parent: int, idx: int, overrides: Sequence[str],
         hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
         slot: DeviceSlot | None) -> None:
    """The child: compose the job's config, run it as Hydra runs a job, send its JobReturn."""
    if slot is not None:  # before anything initialises CUDA, which reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
    for signum, handler in _PREVIOUS_HANDLERS.items():
        signal.signal(signum, handler)
    _stop_with_parent(parent)
    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        result = run_job(hydra_context=hydra_context, task_function=task_function,
                         config=sweep_config, job_dir_key="hydra.sweep.dir",
                         job_subdir_key="hydra.sweep.subdir")
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler, or a second one
        result = JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                           _return_value=RunInterrupted("interrupted by SIGINT; the same "
                                                        "command resumes it", signal.SIGINT))
    except BaseException as err:  # composing failed: the job fails, the sweep goes on
        result = JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                           _return_value=err)
    _finish_wandb()
    try:
        payload = pickle.dumps(result)
    except Exception:  # an error that does not pickle crosses as its type and message
        error = result._return_value
        result._return_value = RuntimeError(f"{type(error).__name__}: {error}")
        payload = pickle.dumps(result)
    writer.send_bytes(payload)


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this job SIGTERM when the sweep's process dies (Linux): a job left
    training after a killed sweep would write into the run dir that the sweep's next start
    gives to the same trial again. SIGTERM stops it after its step, with a checkpoint."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _finish_wandb() -> None:
    # the child leaves by os._exit (multiprocessing's fork), without the atexit hook that
    # closes W&B (its connection to the parent's service, or a service of its own): close
    # it here, as W&B asks of multiprocessing
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        from wandb.sdk import wandb_setup

        wandb_setup.singleton()  # this process's own W&B state, never the parent's
        wandb.teardown()


def _receive(reader: Connection, process: Any, overrides: Sequence[str]) -> JobReturn:
    try:
        result = pickle.loads(reader.recv_bytes())
    except EOFError:  # the child died before sending: killed, out of memory, a crash
        process.join()
        code = process.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit status {code}")
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                         _return_value=RuntimeError(f"the job's process died ({how}) before it "
                                                    f"returned"))
    finally:
        reader.close()
    process.join()
    return result


def _not_started(overrides: Sequence[str], signum: int) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=(
        RunInterrupted(f"not started: the sweep got {signal.Signals(signum).name}; the same "
                       f"command runs it", signum)))
