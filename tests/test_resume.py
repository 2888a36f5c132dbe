"""No work lost: a run killed with SIGKILL, killed while writing a checkpoint, or stopped by
SIGTERM, started again with the same command, ends with the numbers of the same run left
alone; a completed run dir is not trained again; a sweep re-runs an interrupted trial in its
own run dir, so that it resumes there."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hydra_plugins.klsweep_optuna._errors import SweepStopped
from klsweep.checkpoint import ResumeError
from klsweep.config import compose_and_validate
from klsweep.errors import RunInterrupted
from klsweep.records import read_metrics
from klsweep.train import train
from tests.conftest import REPO, run_and_read
from tests.test_sweeper_loop import (  # noqa: F401  (config_loader is a fixture)
    ScriptedLauncher,
    config_loader,
    raises,
    study,
    sweep,
)

QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
# small runs of each algorithm that still checkpoint several times (every 5 steps)
RUNS = {
    "grpo": ["steps=40", "checkpoint.every=5", "algo.prompts_per_step=4", "algo.group_size=4"],
    "ppo": ["algo=ppo", "steps=30", "checkpoint.every=5", "algo.prompts_per_step=4",
            "algo.samples_per_prompt=2", "algo.ppo_epochs=2"],
    # eval_every=3: the last measurement is carried between evaluations, and must be resumed
    "dpo": ["algo=dpo", "steps=30", "checkpoint.every=5", "algo.pairs_per_step=16",
            "algo.dataset_pairs=256", "algo.eval_prompts=4", "algo.eval_every=3"],
    # a moving reference: the resumed run redraws the data set from the initial model
    "dpo-moving-reference": ["algo=dpo", "steps=30", "checkpoint.every=5",
                             "algo.pairs_per_step=16", "algo.dataset_pairs=256",
                             "algo.eval_prompts=4", "kl.reference.sync_every=4"],
}


def steps_of(overrides: list[str]) -> int:
    return next(int(o.split("=")[1]) for o in overrides if o.startswith("steps="))


def quiet(overrides: list[str]) -> dict[str, str]:
    """``overrides`` over QUIET's defaults."""
    return dict(o.split("=", 1) for o in [*QUIET, *overrides])


def run_here(run_dir: Path, overrides: list[str]) -> dict:
    """The run in this process (what the command's Hydra job calls), into ``run_dir``."""
    cfg = compose_and_validate(quiet(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(cfg, run_dir)


def start(run_dir: Path, overrides: list[str], stdout: int = subprocess.DEVNULL
          ) -> subprocess.Popen:
    """The real command, in the background."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    args = [f"{key}={value}" for key, value in quiet(overrides).items()]
    return subprocess.Popen([sys.executable, "-m", "klsweep", *args, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)


def wait_for(process: subprocess.Popen, done, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None, f"the run ended early: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def rows_written(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_run(resumed: Path, alone: Path) -> None:
    """Every logged value of every step, and every final, equal (1e-6), timings aside."""
    rows, expected = read_metrics(resumed / "metrics.jsonl"), read_metrics(alone / "metrics.jsonl")
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, old in zip(rows, expected, strict=True):
        assert set(row) == set(old)
        for key, value in old.items():
            if not key.startswith("perf/"):
                assert math.isclose(row[key], value, rel_tol=1e-6, abs_tol=1e-12), (
                    f"step {old['step']}: {key} = {row[key]!r}, left alone {value!r}")
    summary = json.loads((resumed / "summary.json").read_text())
    finals = json.loads((alone / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == finals["steps_done"]
    for key, value in finals.items():
        if "final" in key and "perf/" not in key:
            assert math.isclose(summary[key], value, rel_tol=1e-6, abs_tol=1e-12), key


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory):
    """Each algorithm's run, uninterrupted (computed once, on first use)."""
    runs: dict[str, Path] = {}

    def get(algo: str) -> Path:
        if algo not in runs:
            runs[algo] = tmp_path_factory.mktemp(f"alone-{algo}")
            run_here(runs[algo], RUNS[algo])
        return runs[algo]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(RUNS))
def test_a_run_killed_halfway_resumes_to_the_numbers_of_the_run_left_alone(
        algo, left_alone, tmp_path):
    run_dir, steps = tmp_path / "run", steps_of(RUNS[algo])
    process = start(run_dir, RUNS[algo])
    wait_for(process, lambda: rows_written(run_dir) >= steps // 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < steps and not (run_dir / "summary.json").exists()
    if algo == "grpo":  # the same command, as a user types it
        summary, _ = run_and_read(run_dir, *RUNS[algo])
    else:
        summary = run_here(run_dir, RUNS[algo])
    assert summary["resumed_from_step"] == saved["global_step"]
    assert_same_run(run_dir, left_alone(algo))


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(
        left_alone, tmp_path):
    # The checkpoint's temporary file is made a FIFO: the next save blocks in mid-write while
    # this test reads the first bytes, and is killed there. The FIFO is then replaced by the
    # bytes it took, which is what a kill in mid-write leaves on disk.
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    process = start(run_dir, RUNS["grpo"])
    wait_for(process, (checkpoints / "last.ckpt").exists)
    fifo = checkpoints / "last.ckpt.tmp"
    wait_for(process, lambda: _made_fifo(fifo))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    partial = bytearray()
    wait_for(process, lambda: len(_read_into(partial, reader)) > 1000)
    process.send_signal(signal.SIGKILL)
    process.wait()
    os.close(reader)
    fifo.unlink()
    fifo.write_bytes(partial)
    previous = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert previous % 5 == 0 and 0 < previous < 40

    summary = run_here(run_dir, RUNS["grpo"])
    assert summary["resumed_from_step"] == previous
    assert_same_run(run_dir, left_alone("grpo"))


def _made_fifo(path: Path) -> bool:
    try:
        os.mkfifo(path)  # fails while a save's own temporary file is there
        return True
    except FileExistsError:
        return False


def _read_into(buffer: bytearray, fd: int) -> bytearray:
    try:
        buffer += os.read(fd, 1 << 16)
    except BlockingIOError:  # the writer is there, and has written nothing more yet
        pass
    return buffer


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_writes_interrupted_and_the_same_command_resumes(
        left_alone, tmp_path):
    run_dir, run = tmp_path / "run", [*RUNS["grpo"], "logger=wandb"]  # W&B offline
    process = start(run_dir, run)
    wait_for(process, lambda: rows_written(run_dir) >= 12)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    done = summary["steps_done"]
    assert summary["reason"] == (f"interrupted by SIGTERM after step {done}; the same command "
                                 f"resumes it")
    # the checkpoint is of the step it stopped after, not of the last multiple of 5
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == done == rows_written(run_dir)

    assert run_here(run_dir, run)["resumed_from_step"] == done
    assert_same_run(run_dir, left_alone("grpo"))
    # the resumed run continued the same W&B run
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")] == [
        run_id, run_id]


@pytest.mark.slow
def test_a_completed_run_dir_is_not_trained_again_and_other_settings_are_refused(
        left_alone, caplog):
    run_dir = left_alone("grpo")
    record = (run_dir / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO, logger="klsweep"):
        summary = run_here(run_dir, RUNS["grpo"])
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "metrics.jsonl").read_text() == record
    assert [r.message for r in caplog.records] == [
        f"klsweep: {run_dir} holds a completed run; nothing to train (resume=never trains it "
        f"again)"]
    with pytest.raises(ResumeError, match=r"holds a run with other settings \(kl.beta=0.05, "
                                          r"not 0.2\); resume=never starts it over"):
        run_here(run_dir, [*RUNS["grpo"], "kl.beta=0.2"])


# --- sweeps: the loop with a stand-in launcher (tests/test_sweeper_loop.py) -----------------
def test_an_interrupted_trial_fails_is_queued_again_and_resumes_in_its_own_run_dir(
        config_loader, tmp_path):  # noqa: F811
    stopped = RunInterrupted("interrupted by SIGTERM after step 7; the same command resumes it",
                             signal.SIGTERM)
    launcher = ScriptedLauncher({1: raises(stopped)}, tmp_path)
    with pytest.raises(SweepStopped, match=r"sweep interrupted \(trial 1 stopped with a "
                                           r"checkpoint\); the same command resumes it"):
        sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=3")
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.WAITING]
    assert trials[1].user_attrs["reason"].startswith("interrupted by SIGTERM")
    assert trials[2].params == trials[1].params
    # not a dead worker's retry: max_retry still allows as many of those as before
    assert trials[2].system_attrs["interrupted_trials"] == [1]
    assert "retry_history" not in trials[2].system_attrs

    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=3")
    trials = study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    # the re-run of trial 1 ran in trial 1's dir, where its checkpoint is
    assert run_dirs(launcher) == {0: 0, 1: 1, 2: 1, 3: 3}


def test_a_trial_re_run_after_its_worker_died_runs_in_the_dead_trials_dir(
        config_loader, tmp_path):  # noqa: F811
    # what Optuna's RetryHeartbeatStaleTrialCallback queues for a stale trial 0
    sweep(config_loader, tmp_path, ScriptedLauncher({}, tmp_path), "hydra.sweeper.n_trials=1")
    stale = study(tmp_path).trials[0]
    study(tmp_path).add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=stale.params, distributions=stale.distributions,
        system_attrs={"failed_trial": 0, "retry_history": [0]}))
    launcher = ScriptedLauncher({}, tmp_path)
    sweep(config_loader, tmp_path, launcher, "hydra.sweeper.n_trials=2")
    assert run_dirs(launcher) == {1: 0}


def run_dirs(launcher: ScriptedLauncher) -> dict[int, int]:
    """Trial number -> the number its run dir is named by, for every job launched."""
    found = {}
    for _, jobs in launcher.batches:
        for job in jobs:
            values = dict(o.split("=", 1) for o in job)
            found[int(values["trial.number"])] = int(values["hydra.sweep.subdir"])
    return found
