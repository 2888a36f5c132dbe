"""klsweep's launcher (hydra/launcher=klsweep_local, every multirun's default): each job in a
process forked from the sweep's, ``n_jobs`` at once, its JobReturn sent back; a job that dies
fails with how it died; SIGTERM reaches the running jobs and starts no others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig

from hydra_plugins.klsweep_local._placement import PlacementError, device_slots
from hydra_plugins.klsweep_local.klsweep_local_launcher import KLSweepLocalLauncher
from klsweep.config import CONF_DIR

RENDEZVOUS_S = 60  # seconds a job (or the test) waits for what must happen before it gives up


@pytest.fixture
def launcher_for(tmp_path: Path) -> Iterator[Callable[..., KLSweepLocalLauncher]]:
    """A set-up launcher whose jobs run ``task`` on the composed multirun config."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def make(task: Callable[[DictConfig], Any], n_jobs: int | None,
                 overrides: Sequence[str] = (), **options: Any) -> KLSweepLocalLauncher:
            config = loader.load_configuration(
                "config", overrides=["logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                     *overrides], run_mode=RunMode.MULTIRUN)
            launcher = KLSweepLocalLauncher(n_jobs=n_jobs, **options)
            context = HydraContext(config_loader=loader, callbacks=Callbacks(config))
            launcher.setup(hydra_context=context, task_function=task, config=config)
            return launcher
        yield make


def jobs(n: int) -> list[list[str]]:
    return [[f"seed={i}"] for i in range(n)]


def started(cfg: DictConfig, rendezvous: Path) -> None:
    """Mark this job started, then wait until two jobs have: only jobs running at once get
    past it (a lone job times out)."""
    (rendezvous / f"{cfg.seed}").touch()
    deadline = time.monotonic() + RENDEZVOUS_S
    while len(list(rendezvous.iterdir())) < 2:
        assert time.monotonic() < deadline, "no second job ran at the same time"
        time.sleep(0.01)


def test_jobs_run_in_forked_processes_n_at_once_and_return_in_order(launcher_for, tmp_path):
    rendezvous = tmp_path / "started"
    rendezvous.mkdir()

    def task(cfg: DictConfig) -> dict[str, Any]:
        if cfg.seed < 2:  # the first two meet; the third starts when one of them ends
            started(cfg, rendezvous)
        return {"seed": cfg.seed, "pid": os.getpid()}

    results = launcher_for(task, n_jobs=2).launch(jobs(3), initial_job_idx=0)

    assert [r.status for r in results] == [JobStatus.COMPLETED] * 3
    assert [r.return_value["seed"] for r in results] == [0, 1, 2]
    pids = {r.return_value["pid"] for r in results}
    assert len(pids) == 3 and os.getpid() not in pids  # a fresh process for every job
    assert [r.hydra_cfg.hydra.job.num for r in results] == [0, 1, 2]
    assert [Path(r.hydra_cfg.hydra.runtime.output_dir) for r in results] == [
        tmp_path / "sweep" / str(i) for i in range(3)]  # one dir per job


def test_n_jobs_null_runs_one_job_per_usable_core_by_the_runs_threads(launcher_for):
    launcher = launcher_for(lambda cfg: None, n_jobs=None)
    assert launcher.n_jobs == max(1, len(os.sched_getaffinity(0)))  # threads: 1


def test_a_job_whose_process_dies_fails_with_how_it_died_and_the_others_complete(
        launcher_for, capsys):
    def task(cfg: DictConfig) -> int:
        if cfg.seed == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return cfg.seed

    results = launcher_for(task, n_jobs=2).launch(jobs(3), initial_job_idx=0)

    assert [r.status for r in results] == [JobStatus.COMPLETED, JobStatus.FAILED,
                                           JobStatus.COMPLETED]
    assert str(results[1]._return_value) == ("the job's process died (killed by SIGKILL) "
                                             "before it returned")
    assert (results[0].return_value, results[2].return_value) == (0, 2)
    # the console: a line per job that starts and ends, why one failed, the sweep's progress
    lines = [line for line in capsys.readouterr().out.splitlines() if "klsweep: " in line]
    assert sum(" started" in line for line in lines) == 3
    assert any(line.endswith("klsweep: job 1 failed · RuntimeError: the job's process died "
                             "(killed by SIGKILL) before it returned") for line in lines)
    assert " 3 of 3 jobs done · 2 completed, 1 failed · 0 running · " in lines[-1]


def test_a_job_that_raises_returns_its_error_as_hydra_does(launcher_for):
    def task(cfg: DictConfig) -> None:
        raise ValueError(f"bad seed {cfg.seed}")

    (result,) = launcher_for(task, n_jobs=1).launch(jobs(1), initial_job_idx=0)
    assert result.status == JobStatus.FAILED
    assert isinstance(result._return_value, ValueError)
    assert str(result._return_value) == "bad seed 0"


def test_sigterm_reaches_the_running_jobs_and_starts_no_other(launcher_for, tmp_path):
    rendezvous = tmp_path / "started"
    rendezvous.mkdir()

    def task(cfg: DictConfig) -> str:
        got: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
        started(cfg, rendezvous)
        deadline = time.monotonic() + RENDEZVOUS_S
        while not got:
            assert time.monotonic() < deadline, "SIGTERM never came"
            time.sleep(0.01)
        return "stopped by SIGTERM"

    def terminate_once_both_started() -> None:
        deadline = time.monotonic() + RENDEZVOUS_S
        while len(list(rendezvous.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # to the launcher, as a scheduler sends it

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_both_started, daemon=True).start()
    results = launcher_for(task, n_jobs=2).launch(jobs(3), initial_job_idx=0)

    assert [r.return_value for r in results[:2]] == ["stopped by SIGTERM"] * 2
    assert results[2].status == JobStatus.FAILED
    assert getattr(results[2]._return_value, "status", None) == "interrupted"  # queued again
    assert str(results[2]._return_value).startswith("not started: the sweep got SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's handler is gone


def test_a_bad_n_jobs_fails_in_one_line_before_any_job(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "klsweep", "-m", "seed=0,1", "logger=none",
         "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("klsweep: error: hydra.launcher.n_jobs must be a whole "
                                     "number ≥ 1 or null (got 0)")
    assert not (tmp_path / "sweep").exists()


def test_a_stop_between_two_jobs_returns_the_rest_as_not_started(launcher_for):
    # one job at a time: the first asks for the stop and ends, so no job is running when the
    # launcher finds the rest must not start (it then waited on nothing, for ever)
    def task(cfg: DictConfig) -> int:
        if cfg.seed == 0:  # the SIGTERM passed back to it is ignored: a run stops after a step
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.kill(os.getppid(), signal.SIGTERM)
        return cfg.seed

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("the launcher waits on no running job")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(RENDEZVOUS_S)  # a failure, not a suite that never ends
    try:
        results = launcher_for(task, n_jobs=1).launch(jobs(3), initial_job_idx=0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    assert results[0].return_value == 0
    assert [getattr(r._return_value, "status", None) for r in results[1:]] == ["interrupted"] * 2


def test_gpu_slots_fill_the_node_and_never_share_a_gpu_unless_asked():
    eight = [str(i) for i in range(8)]
    assert device_slots(eight, 0) == []  # CPU trials: the core rule decides
    assert device_slots(eight, 1) == [(gpu,) for gpu in eight]
    assert device_slots(eight, 2) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert device_slots(eight, 3) == [("0", "1", "2"), ("3", "4", "5")]  # 6 and 7 stay idle
    assert device_slots(eight, 8) == [tuple(eight)]
    assert device_slots(["0", "1"], 1, trials_per_gpu=2) == [("0",), ("1",), ("0",), ("1",)]
    with pytest.raises(PlacementError, match="a trial needs 3 GPUs .* may use 2"):
        device_slots(["0", "1"], 3)
    with pytest.raises(PlacementError, match="trials_per_gpu=2 shares a GPU"):
        device_slots(eight, 2, trials_per_gpu=2)


def test_each_trial_sees_only_its_own_gpus_and_the_node_runs_as_many_as_it_holds(
        launcher_for, tmp_path):
    """Four GPUs, two per trial: two trials at once, one on GPUs 0,1 and one on 2,3; the task
    only reads its environment, so no GPU is needed to check where it was placed."""
    rendezvous = tmp_path / "started"
    rendezvous.mkdir()

    def task(cfg: DictConfig) -> str:
        if cfg.seed < 2:  # the first two run together, each holding one slot
            started(cfg, rendezvous)
        return os.environ["CUDA_VISIBLE_DEVICES"]

    launcher = launcher_for(task, None, ["trainer.accelerator=gpu", "trainer.devices=2"],
                            gpus=[0, 1, 2, 3])
    assert launcher.n_jobs == 2 and launcher.slots == [("0", "1"), ("2", "3")]
    results = launcher.launch(jobs(4), initial_job_idx=0)
    seen = [r.return_value for r in results]
    assert sorted(seen[:2]) == ["0,1", "2,3"]  # the two that ran together held both slots
    assert set(seen[2:]) <= {"0,1", "2,3"}  # later ones took a freed slot
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] \
        not in {"0,1", "2,3"}  # the sweep's own process is left as it was


def test_n_jobs_above_the_gpu_slots_is_capped_and_a_trial_too_large_fails_in_one_line(
        launcher_for, capsys):
    launcher = launcher_for(lambda cfg: None, 4, ["trainer.accelerator=gpu"], gpus=[0, 1])
    assert launcher.n_jobs == 2  # never two trials on one GPU unless trials_per_gpu says so
    shared = launcher_for(lambda cfg: None, None, ["trainer.accelerator=gpu"], gpus=[0, 1],
                          trials_per_gpu=2)
    assert shared.n_jobs == 4
    with pytest.raises(SystemExit) as stop:
        launcher_for(lambda cfg: None, None, ["trainer.accelerator=gpu", "trainer.devices=4"],
                     gpus=[0, 1])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "klsweep: error: a trial needs 4 GPUs (trainer.devices) and the sweep may use 2 (0,1)")
