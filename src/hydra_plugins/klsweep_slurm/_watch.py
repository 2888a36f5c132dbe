"""Waiting for a batch's Slurm jobs. A trial's result is the JobReturn its job pickled, or, for
a job that Slurm ended without one (``scancel``, the time limit, a lost node), a FAIL with
Slurm's reason. A job that goes back to PENDING (requeued after a preemption, ``scontrol
requeue`` or its time limit) is waited for: its trial stays one trial, RUNNING in the study,
its heartbeat recorded by the sweep all the while (``klsweep_optuna``'s Heartbeat)."""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Slurm's job states (squeue(1), JOB STATE CODES) in which a job may still run its trial
STILL_ON = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
            "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED",
            "SPECIAL_EXIT", "RESV_DEL_HOLD", "POWER_UP_NODE"}
# what the states in which Slurm itself ended a job mean, for the trial's reason
ENDED_BECAUSE = {"CANCELLED": "was cancelled (scancel)",
                 "TIMEOUT": "reached its time limit (hydra.launcher.timeout_min)",
                 "OUT_OF_MEMORY": "ran out of memory (hydra.launcher.mem_gb)",
                 "NODE_FAIL": "lost its node", "BOOT_FAIL": "could not boot its node",
                 "DEADLINE": "passed its deadline",
                 "PREEMPTED": "was preempted and not requeued"}
# seconds to wait, after Slurm says a job ended, for the result its process may have written
# (a network file system shows a new file late; submitit allows 15 s); a preempted job may
# still be requeued
RESULT_GRACE_S = {"COMPLETED": 15.0, "FAILED": 15.0, "UNLISTED": 15.0, "PREEMPTED": 60.0}
MAX_POLL_S = 30.0  # between two questions to slurmctld, late in a long wait


class SlurmJobEnded(RuntimeError):
    """A trial's Slurm job that ended without its run's result. ``status`` is Slurm's state in
    lower case, the trial's ``status`` attribute."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.status)


@dataclass
class Trial:
    overrides: list[str]
    run_dir: Path


def failed(trial: Trial, error: BaseException) -> JobReturn:
    """A FAIL for the sweeper: the run dir its record names, and the error as the reason."""
    result = JobReturn(overrides=trial.overrides, status=JobStatus.FAILED,
                       hydra_cfg=OmegaConf.create(
                           {"hydra": {"runtime": {"output_dir": str(trial.run_dir)}}}))
    result.return_value = error
    return result


def submit_failed(trials: Sequence[Trial], err: Exception) -> list[JobReturn]:
    """Every trial of a batch that sbatch refused fails with sbatch's last line."""
    reason = last_line(str(err)).removeprefix("sbatch: error: ")
    log.error(f"klsweep: sbatch refused the batch's job array: {reason}")
    return [failed(trial, SlurmJobEnded(f"sbatch refused the trial's job: {reason}", "failed"))
            for trial in trials]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


# --- what Slurm says ---------------------------------------------------------------------------
def queued_states(array_ids: set[str]) -> dict[str, tuple[str, str]] | None:
    """``{job id: (state, reason)}`` of the jobs slurmctld still holds (a finished one for
    MinJobAge, 300 s by default), each array task on its own (``12_3``); None when squeue
    could not answer (the controller busy or restarting)."""
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r",
               f"--jobs={','.join(sorted(array_ids))}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id.strip()] = (state.strip(), reason.strip())
    return states


def accounted_state(job_id: str) -> str | None:
    """The state Slurm's accounting kept of a job slurmctld no longer holds; None where the
    cluster keeps no accounting (sacct fails)."""
    command = ["sacct", "--noheader", "--parsable2", "--format=JobID,State", f"--jobs={job_id}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in done.stdout.splitlines() if done.returncode == 0 else ():
        listed, _, state = line.partition("|")
        if listed == job_id and state:
            return state.split()[0]  # "CANCELLED by 0"
    return None


# --- the wait -------------------------------------------------------------------------------------
def wait_for_results(jobs: Sequence[Any], trials: Sequence[Trial]) -> list[JobReturn]:
    """The JobReturn of every job, in order, once each has one: its pickled result, read as
    soon as it exists, or a FAIL once Slurm says the job ended without it. Slurm is asked every
    second at first, then less often (up to every 30 s) as the wait grows."""
    results: dict[int, JobReturn] = {}
    waiting = dict(enumerate(jobs))
    shown: dict[int, str] = {}  # the state each job was last seen in
    ended_at: dict[int, float] = {}
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    started, asked = time.monotonic(), -math.inf
    while waiting:
        for i, job in list(waiting.items()):
            if job.paths.result_pickle.exists():
                results[i] = read_result(job, trials[i])
                del waiting[i]
        now = time.monotonic()
        if waiting and now - asked >= min(MAX_POLL_S, 1.0 + (now - started) / 10):
            asked = now
            states = queued_states(array_ids)
            for i, job in list(waiting.items()) if states is not None else ():
                state, reason = states.get(job.job_id) or (
                    accounted_state(job.job_id) or "UNLISTED", "")
                if shown.get(i) in ("RUNNING", "COMPLETING") and state in ("PENDING",
                                                                           "REQUEUED"):
                    log.info(f"klsweep: Slurm job {job.job_id} was requeued ({reason}); its "
                             f"trial resumes from its checkpoint when the job runs again")
                shown[i] = state
                if state in STILL_ON:
                    ended_at.pop(i, None)
                    continue
                if now - ended_at.setdefault(i, now) >= RESULT_GRACE_S.get(state, 0.0) \
                        and not job.paths.result_pickle.exists():
                    results[i] = failed(trials[i], ended_without_result(job, state))
                    del waiting[i]
        if waiting:
            time.sleep(1.0)
    return [results[i] for i in range(len(jobs))]


def read_result(job: Any, trial: Trial) -> JobReturn:
    """What the job's process pickled: the run's JobReturn, or the trace of an exception
    outside the run (submitit's ``("error", trace)``), failed with its last line."""
    from submitit.core.utils import pickle_load

    outcome, value = pickle_load(job.paths.result_pickle)
    if outcome == "success":
        return value
    return failed(trial, SlurmJobEnded(f"Slurm job {job.job_id} raised {last_line(value)} "
                                       f"(its log: {job.paths.stderr})", "failed"))


def ended_without_result(job: Any, state: str) -> SlurmJobEnded:
    if state in ENDED_BECAUSE:
        return SlurmJobEnded(f"Slurm job {job.job_id} {ENDED_BECAUSE[state]} before its run "
                             f"finished", state.lower())
    where = "is no longer listed by Slurm" if state == "UNLISTED" else f"ended {state}"
    return SlurmJobEnded(f"Slurm job {job.job_id} {where} without a result (its log: "
                         f"{job.paths.stderr})", state.lower())
