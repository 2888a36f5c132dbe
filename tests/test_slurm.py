"""Sweeps and runs on a real Slurm cluster (``scripts/slurm_local.sh start``; ``.ci/run`` starts
one): a sweep's trials as one job array with the local launcher's numbers; a trial requeued mid-
run, or warned of its time limit, that resumes and ends COMPLETE once with the numbers of its
twin left alone; a cancelled trial that fails with Slurm's reason; DDP whose ranks are srun's
tasks, requeued too; and the settings refused in one line before any job.

The tests wait for what they check (rows of a record, a job's state), never for a clock; the
one-node cluster lets a requeued job start again after 5 s (``cred_expire``, see the script)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hydra_plugins.klsweep_optuna._search_space import override_string
from klsweep.records import read_metrics
from tests.slurm_cluster import SLURM_ENV, needs_cluster
from tests.test_resume import assert_same_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow, needs_cluster]

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
# an Optuna study of 4 trials on the exact task, 150 steps each: a few seconds of training, in
# which a test catches a trial mid-run (after 10 steps) however loaded the machine is
STUDY = ["sweep=beta_target", "task=exact", "steps=150", *QUIET, "hydra.sweeper.n_trials=4",
         "hydra.sweeper.n_jobs=4"]
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.array_parallelism=2"]
# data parallel on two CPU ranks; 40 steps, for a job caught mid-run
DDP_RUN = ["steps=40", "algo.prompts_per_step=2", "algo.group_size=2", "checkpoint.every=100",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", *QUIET]
TIMEOUT_S = 600
POSTGRES_URL = os.environ.get("KLSWEEP_TEST_POSTGRES_URL")


def environment() -> dict[str, str]:
    assert SLURM_ENV is not None
    return {**SLURM_ENV, "WANDB_MODE": "offline"}


def klsweep(*args: str, background: bool = False) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "klsweep", *args]
    if background:
        return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def slurm(*command: str) -> str:
    done = subprocess.run(command, env=environment(), capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def study(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="beta_target",
                             storage=f"sqlite:///{sweep_dir / 'optuna.db'}").trials


def rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_until(done: Callable[[], bool], process: subprocess.Popen | None = None,
               what: str = "") -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, f"waited {TIMEOUT_S} s for {what}"
        time.sleep(0.05)


def slurm_job(run_dir: Path) -> str:
    """The Slurm job that ran the trial in ``run_dir`` (Hydra's job id there)."""
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    return str(hydra["job"]["id"])


def job_state(job: str) -> str:
    return slurm("squeue", "--noheader", "--array", "--states=all", "--format=%T",
                 f"--jobs={job}").strip()


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, output


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """The study run by the local launcher, each trial left alone."""
    sweep_dir = tmp_path_factory.mktemp("local")
    result = klsweep("-m", *STUDY, f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr
    return sweep_dir


def assert_twins(trial: optuna.trial.FrozenTrial, twin_trial: optuna.trial.FrozenTrial) -> None:
    """The same params, the same objectives to the bit, every logged value equal."""
    assert trial.params == twin_trial.params
    assert trial.values == twin_trial.values
    assert_same_run(Path(trial.user_attrs["run_dir"]), Path(twin_trial.user_attrs["run_dir"]))


# --- sweeps ---------------------------------------------------------------------------------------
def test_a_sweeps_trials_run_as_one_slurm_job_array_with_the_local_launchers_numbers(
        twin, tmp_path):
    result = klsweep("-m", *STUDY, *SLURM, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    trials = study(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    jobs = [slurm_job(Path(t.user_attrs["run_dir"])) for t in trials]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_{i}" for i in range(4)]  # one array, a task per trial
    script = (tmp_path / ".submitit" / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%2" in script  # two at a time
    for trial, twin_trial in zip(trials, study(twin), strict=True):
        assert_twins(trial, twin_trial)


@pytest.mark.postgres
@pytest.mark.skipif(not POSTGRES_URL, reason="KLSWEEP_TEST_POSTGRES_URL is not set: no "
                    "PostgreSQL server to share a study (.ci/run starts one)")
def test_trials_in_slurm_jobs_share_a_study_in_postgres(twin, tmp_path):
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    result = klsweep("-m", *STUDY, *SLURM, "hydra.sweeper.n_trials=2",
                     override_string("hydra.sweeper.storage", POSTGRES_URL),
                     f"hydra.sweeper.study_name={name}", f"hydra.sweep.dir={tmp_path}")
    try:
        assert result.returncode == 0, result.stderr
        trials = optuna.load_study(study_name=name, storage=POSTGRES_URL).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
        for trial, twin_trial in zip(trials, study(twin)[:2], strict=True):
            assert_twins(trial, twin_trial)
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES_URL)


def test_a_trial_requeued_mid_run_resumes_and_ends_complete_once_with_its_twins_numbers(
        twin, tmp_path):
    heartbeat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    sweep = klsweep("-m", *STUDY, *SLURM, *heartbeat, f"hydra.sweep.dir={tmp_path}",
                    background=True)
    run_dir = tmp_path / "1"
    wait_until(lambda: rows(run_dir) >= 10, sweep, "trial 1 ran 10 steps")
    job = slurm_job(run_dir)
    slurm("scontrol", "requeue", job)
    requeued = time.monotonic()
    wait_until(lambda: job_state(job) == "PENDING", sweep, f"job {job} was pending again")
    # Slurm holds the job pending (BeginTime) past the grace period of the trials' heartbeat:
    # another worker of the study would still find trial 1 alive, and not fail it as stale
    wait_until(lambda: time.monotonic() - requeued > 4 or job_state(job) != "PENDING")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                         heartbeat_interval=1, grace_period=3)
    optuna.storages.fail_stale_trials(optuna.load_study(study_name="beta_target",
                                                        storage=storage))
    assert study(tmp_path)[1].state == TrialState.RUNNING

    returncode, output = finish(sweep)
    assert returncode == 0, output
    assert f"Slurm job {job} was requeued" in output
    trials = study(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # none lost, none twice
    assert 10 <= summary(run_dir)["resumed_from_step"] < 150
    for trial, twin_trial in zip(trials, study(twin), strict=True):
        assert_twins(trial, twin_trial)


def test_a_trial_warned_of_its_time_limit_is_requeued_by_submitit_and_resumes(twin, tmp_path):
    # Slurm warns a job signal_delay_s before its time limit with the signal submitit asks for
    # (sbatch --signal=USR2@N); its 30-s timer decides when, so the test sends it itself
    sweep = klsweep("-m", *STUDY, *SLURM, "hydra.sweeper.n_trials=1",
                    "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5",
                    f"hydra.sweep.dir={tmp_path}", background=True)
    run_dir = tmp_path / "0"
    wait_until(lambda: rows(run_dir) >= 10, sweep, "trial 0 ran 10 steps")
    job = slurm_job(run_dir)
    slurm("scancel", "--signal=USR2", job)
    returncode, output = finish(sweep)
    assert returncode == 0, output
    [trial] = study(tmp_path)
    assert trial.state == TrialState.COMPLETE
    log = next((tmp_path / ".submitit" / job).glob("*_log.out")).read_text()
    assert f"Requeued job {job} (2 remaining timeouts)" in log  # submitit's path, its count
    assert "klsweep: SIGUSR2: stopping after this step, with a checkpoint" in log
    # a sweep's trial keeps its summary line to its own log (the sweep prints its events)
    run_log = (run_dir / "__main__.log").read_text()
    assert re.search(r"interrupted after \d+/150 steps", run_log), run_log
    assert summary(run_dir)["resumed_from_step"] >= 10
    assert_twins(trial, study(twin)[0])


def test_a_cancelled_trial_fails_with_slurms_reason_and_the_same_command_runs_what_is_missing(
        tmp_path):
    # max_failures=1 ends the sweep after the cancelled trial's batch; with the default, the
    # sweep asks for another trial at once
    args = ["-m", *STUDY, *SLURM, "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failures=1",
            f"hydra.sweep.dir={tmp_path}"]
    sweep = klsweep(*args, background=True)
    wait_until(lambda: rows(tmp_path / "0") >= 10, sweep, "trial 0 ran 10 steps")
    job = slurm_job(tmp_path / "0")
    slurm("scancel", job)
    returncode, output = finish(sweep)
    assert returncode == 1 and "sweep stopped after 1 failed trials" in output, output
    cancelled, other = study(tmp_path)
    assert (cancelled.state, other.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert cancelled.user_attrs["reason"] == (f"Slurm job {job} was cancelled (scancel) "
                                              f"before its run finished")
    assert cancelled.user_attrs["status"] == "cancelled"

    result = klsweep(*args)
    assert result.returncode == 0, result.stderr
    trials = study(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert trials[0].user_attrs["reason"] == cancelled.user_attrs["reason"]


# --- DDP launched by srun -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_twin(tmp_path_factory) -> Path:
    """The DDP run launched without Slurm: Lightning starts rank 1 itself."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = klsweep(*DDP_RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_two_srun_tasks_are_the_two_ranks_of_the_ddp_run_launched_without_slurm(
        ddp_twin, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(["srun", "--ntasks=2", sys.executable, "-m", "klsweep", *DDP_RUN,
                           f"hydra.run.dir={run_dir}"], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    # rank 0 alone prints and records; every step reduced over the two tasks
    assert [line for line in done.stdout.splitlines() if line.startswith("klsweep:")] == [
        line for line in done.stdout.splitlines() if "completed after 40/40 steps" in line]
    assert all(row["dist/world_size"] == 2 for row in read_metrics(run_dir / "metrics.jsonl"))
    assert_same_run(run_dir, ddp_twin)


def test_a_requeued_two_task_job_resumes_its_ddp_run_exactly(ddp_twin, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + " ".join(
        ["srun", sys.executable, "-m", "klsweep", *DDP_RUN, f"hydra.run.dir={run_dir}"]) + "\n")
    job = slurm("sbatch", "--parsable", "--ntasks=2", "--open-mode=append", f"--output={log}",
                f"--chdir={REPO}", str(script)).strip()
    wait_until(lambda: rows(run_dir) >= 10, None, "the run's 10th step")
    slurm("scontrol", "requeue", job)
    wait_until(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), None,
               f"job {job} to end")
    assert job_state(job) == "COMPLETED", log.read_text()
    assert "Restarts=1" in slurm("scontrol", "show", "job", job)
    text = log.read_text()
    assert text.count("klsweep: SIGTERM: stopping after this step, with a checkpoint") == 2
    assert 10 <= summary(run_dir)["resumed_from_step"] < 40
    assert_same_run(run_dir, ddp_twin)


# --- refused before any job ----------------------------------------------------------------------
def assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("klsweep: error: "), \
        result.stderr
    assert message in result.stderr


def test_a_partition_that_does_not_exist_is_refused_with_slurms_own_message(tmp_path):
    result = klsweep("-m", *STUDY, *SLURM, "hydra.launcher.partition=nowhere",
                     f"hydra.sweep.dir={tmp_path}")
    # sbatch --test-only's own words (a real submission says "Batch job submission failed: ")
    assert_one_line(result, "Slurm refuses the trials' jobs (hydra.launcher.partition=nowhere): "
                            "allocation failure: Invalid partition name specified")
    assert not (tmp_path / "optuna.db").exists()


def test_trials_with_more_devices_than_their_jobs_tasks_are_refused_before_any_job(tmp_path):
    result = klsweep("-m", *STUDY, *SLURM, "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.precision=32-true",
                     f"hydra.sweep.dir={tmp_path}")
    assert_one_line(result, "trainer.devices=2 needs 2 Slurm tasks on each node, one per "
                            "device, and the job has 1 (hydra.launcher.nodes=1, "
                            "hydra.launcher.tasks_per_node=1): set "
                            "hydra.launcher.tasks_per_node=2, or trainer.devices=1")
    assert not (tmp_path / "optuna.db").exists()


def test_a_run_with_more_devices_than_srun_tasks_is_refused_by_one_task_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(["srun", "--ntasks=2", sys.executable, "-m", "klsweep", *DDP_RUN,
                           "trainer.devices=4", f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 2
    [line] = [line for line in done.stderr.splitlines() if line.startswith("klsweep:")]
    assert line == ("klsweep: error: trainer.devices=4 needs 4 Slurm tasks on each node, one "
                    "per device, and the job has 2 (SLURM_NTASKS=2, SLURM_NNODES=1): set srun "
                    "--ntasks-per-node=4, or trainer.devices=2")
    assert not run_dir.exists()


def test_starting_the_cluster_again_changes_nothing_and_says_where_it_is():
    conf = environment().get("SLURM_CONF")
    if conf is None:
        pytest.skip("the cluster is this machine's own Slurm, not scripts/slurm_local.sh's")
    env = {**environment(), "KLSWEEP_SLURM_DIR": str(Path(conf).parent)}
    booted = [line for line in slurm("scontrol", "show", "config").splitlines()
              if line.startswith("BOOT_TIME")]
    done = subprocess.run([str(REPO / "scripts" / "slurm_local.sh"), "start"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"export SLURM_CONF={conf}\n", "")
    # the same controller, not a new one started over the first
    assert [line for line in slurm("scontrol", "show", "config").splitlines()
            if line.startswith("BOOT_TIME")] == booted

