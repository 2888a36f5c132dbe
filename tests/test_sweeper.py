"""The Optuna sweeper end to end: the real command, real Optuna storage, real runs."""

from __future__ import annotations

import csv
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.job_log import read_job_log

REPO = Path(__file__).resolve().parents[1]
# tiny runs: two prompts of four completions per step, no progress bar, no W&B
FAST = ["logger=none", "trainer.enable_progress_bar=false", "algo.prompts_per_step=2",
        "algo.group_size=4"]


def klsweep(*args: str, sweep_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "klsweep", "-m", *args,
                           f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def load(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def wandb_run_record(run_dir: Path):
    """The run record (group, config) of the offline W&B run in ``run_dir``: the .wandb file
    is a LevelDB-style log of protobuf records in 32 KiB blocks after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("wandb/offline-run-*/*.wandb")).read_bytes()
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {run_dir}")


@pytest.mark.slow
def test_sweep_writes_its_files_and_the_same_command_resumes_to_n_trials(tmp_path):
    args = ["sweep=beta_target", "steps=2", *FAST, "logger=wandb"]
    first = klsweep(*args, "hydra.sweeper.n_trials=2", sweep_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert states(load(tmp_path, "beta_target")) == ["COMPLETE", "COMPLETE"]

    second = klsweep(*args, "hydra.sweeper.n_trials=3", sweep_dir=tmp_path)
    assert second.returncode == 0, second.stderr
    study = load(tmp_path, "beta_target")
    assert states(study) == ["COMPLETE"] * 3  # exactly one trial added
    assert len({tuple(t.params.values()) for t in study.trials}) == 3  # not a replayed draw
    assert all(set(t.params) == {"kl.beta", "kl.target"} for t in study.trials)
    assert "Pareto front (pareto.yaml)" in second.stdout + second.stderr

    rows = read_csv(tmp_path / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {"state", "reward/final", "kl/final", "kl.beta", "kl.target", "duration_s",
            "reason", "run_dir"} <= set(rows[0])
    pareto = yaml.safe_load((tmp_path / "pareto.yaml").read_text())
    assert pareto["objectives"] == {"reward/final": "maximize", "kl/final": "minimize"}
    assert pareto["pareto"] and all(
        set(p["values"]) == {"reward/final", "kl/final"} for p in pareto["pareto"])
    for trial in study.trials:  # one dir per trial, named by its number
        run_dir = tmp_path / str(trial.number)
        assert (run_dir / "summary.json").exists()
        assert trial.user_attrs["run_dir"] == str(run_dir)
        run = wandb_run_record(run_dir)
        assert run.run_group == tmp_path.name
        config = {item.key: yaml.safe_load(item.value_json) for item in run.config.update}
        assert config["trial"]["number"] == trial.number
        assert config["kl"]["beta"] == pytest.approx(trial.params["kl.beta"])
        assert config["kl"]["target"] == pytest.approx(trial.params["kl.target"])


@pytest.mark.parametrize(("override", "message"), [
    ("kl.betta=interval(0.1, 0.2)",
     "searched key kl.betta is not a known key (allowed under kl: beta, target,"),
    ("kl.beta=interval(0.2, 0.1)", "kl.beta=interval(0.2, 0.1): interval(0.2, 0.1) is empty"),
    ("+hydra.sweeper.objectives={kl/finale:minimize}",
     "hydra.sweeper.objectives: kl/finale is not a number of a run's summary"),
])
def test_a_bad_sweep_config_fails_in_one_line_before_any_trial(tmp_path, override, message):
    result = klsweep("sweep=beta_target", *FAST, override, sweep_dir=tmp_path / "sweep")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("klsweep: error: ") and message in lines[0], \
        result.stderr
    assert not (tmp_path / "sweep").exists()  # no study, no trial dir


# Two knobs whose bad values fail a run in two ways: lr=1e10 with one update per rollout
# makes the next rollout's sampling raise (inf logits), and with two updates the second
# update's loss is NaN (RunFailed). The other two grid points complete.
FAILING_GRID = ["kl.beta=0.05", "kl.target=0.05", "hydra.sweeper.sampler.name=grid",
                "optim.lr=choice(3e-4, 1e10)",
                "algo.updates_per_rollout=choice(1, 2)", "hydra.sweeper.n_trials=4"]


@pytest.mark.slow
def test_failing_trials_are_recorded_with_their_reasons_and_the_sweep_goes_on(tmp_path):
    result = klsweep("sweep=beta_target", "steps=2", *FAST, *FAILING_GRID, sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = {(t.params["optim.lr"], t.params["algo.updates_per_rollout"]): t
              for t in load(tmp_path, "beta_target").trials}
    assert len(trials) == 4
    assert trials[3e-4, 1].state == trials[3e-4, 2].state == TrialState.COMPLETE
    raised, nan = trials[1e10, 1], trials[1e10, 2]
    assert raised.state == nan.state == TrialState.FAIL
    assert raised.user_attrs["reason"].startswith("RuntimeError: probability tensor")
    assert nan.user_attrs["reason"] == "loss is nan at step 0"
    assert nan.user_attrs["status"] == "failed"
    reasons = {r["number"]: r["reason"] for r in read_csv(tmp_path / "trials.csv")}
    assert reasons[str(nan.number)] == "loss is nan at step 0"


@pytest.mark.slow
def test_max_failures_stops_the_sweep_early_with_one_line(tmp_path):
    result = klsweep("sweep=beta_target", "steps=2", *FAST, *FAILING_GRID,
                     "hydra.sweeper.max_failures=1", sweep_dir=tmp_path)
    assert result.returncode != 0
    assert "klsweep: sweep stopped after 1 failed trials (hydra.sweeper.max_failures=1)" \
        in result.stderr
    found = states(load(tmp_path, "beta_target"))
    assert found.count("FAIL") == 1 and len(found) < 4  # two of four points fail
    assert len(read_csv(tmp_path / "trials.csv")) == len(found)


@pytest.mark.slow
def test_the_pruner_stops_clearly_bad_trials_and_records_them_as_pruned(tmp_path):
    # lr=1e-7 leaves the policy at the reference (reward ~0.5) while lr=1e-2 climbs toward
    # 0.8 within six steps; the median pruner compares each trial with the earlier ones
    result = klsweep(
        "sweep=beta_target", "steps=6", *FAST, "hydra.sweeper.study_name=pruning",
        "hydra.sweeper.objectives={kl/final:null}",  # reward/final alone: prunable
        "kl.beta=0.05", "kl.target=0.05", "hydra.sweeper.sampler.name=grid",
        "optim.lr=choice(1e-2, 1e-7)", "seed=range(0, 3)",
        "hydra.sweeper.pruner.name=median", "+hydra.sweeper.pruner.n_startup_trials=1",
        "+hydra.sweeper.pruner.n_warmup_steps=2", "hydra.sweeper.report_every=1",
        "hydra.sweeper.n_trials=6", sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load(tmp_path, "pruning")
    seen = [(t.number, t.state.name, t.params) for t in study.trials]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert any(t.params["optim.lr"] == 1e-7 for t in pruned), seen
    assert study.best_trial.params["optim.lr"] == 1e-2, seen
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["objectives"] == {"reward/final": "maximize"}
    assert best["best"]["number"] == study.best_trial.number
    assert "optim.lr=0.01" in best["best"]["command"].split()
    for trial in pruned:
        assert trial.user_attrs["reason"].startswith("pruned after step")
        assert trial.intermediate_values  # reported through the storage by the run
        summary = yaml.safe_load((tmp_path / str(trial.number) / "summary.json").read_text())
        assert summary["status"] == "pruned"
        assert summary["steps_done"] < 6


@pytest.mark.slow
def test_a_trial_left_running_by_a_killed_worker_is_failed_and_run_again(tmp_path):
    args = ["sweep=beta_target", "steps=200", *FAST, "hydra.sweeper.n_trials=1",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    worker = subprocess.Popen([sys.executable, "-m", "klsweep", "-m", *args,
                               f"hydra.sweep.dir={tmp_path}"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "0" / "metrics.jsonl").exists():  # trial 0 is training
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        jobs = children(worker.pid)  # the trial's process, forked by klsweep_local
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert jobs
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in jobs):  # it stops with the sweep
        assert time.monotonic() < deadline, f"jobs {jobs} outlived the killed sweep"
        time.sleep(0.2)
    # the kernel's SIGTERM (klsweep_local asks for it) stopped it after a step, checkpointed
    assert yaml.safe_load((tmp_path / "0" / "summary.json").read_text())["status"] \
        == "interrupted"
    assert states(load(tmp_path, "beta_target")) == ["RUNNING"]

    rerun = klsweep(*args, sweep_dir=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    study = load(tmp_path, "beta_target")
    assert states(study) == ["FAIL", "COMPLETE"]
    stale, retried = study.trials
    assert retried.params == stale.params
    assert retried.system_attrs["failed_trial"] == 0


def children(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_the_joblib_launcher_runs_a_batch_of_two_trials_at_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher",
                        reason="hydra-joblib-launcher is not installed (extra [launchers])")
    result = klsweep("sweep=beta_target", "steps=10", *FAST, "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                     "hydra.sweeper.n_trials=2", *job_log(tmp_path / "log", batch=2),
                     sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert states(load(tmp_path, "beta_target")) == ["COMPLETE", "COMPLETE"]
    assert_own_processes_n_at_once(tmp_path / "log", n_trials=2, n_jobs=2)


def job_log(directory: Path, batch: int) -> list[str]:
    """The overrides that record each job's process and make a batch's jobs meet."""
    return ["+hydra.callbacks.log._target_=tests.job_log.JobLog",
            f"+hydra.callbacks.log.directory={directory}", f"+hydra.callbacks.log.batch={batch}"]


def assert_own_processes_n_at_once(directory: Path, n_trials: int, n_jobs: int) -> None:
    """Each trial ran in a process of its own, not the sweep's; the ``n_jobs`` trials of each
    batch were running at one moment (they met), and no more than ``n_jobs`` ever were."""
    sweep_pid, jobs = read_job_log(directory)
    assert sorted(jobs) == list(range(n_trials))
    pids = [pid for pid, _, _ in jobs.values()]
    assert len(set(pids)) == n_trials and sweep_pid not in pids
    assert all(met for _, _, met in jobs.values()), f"a batch's jobs never ran at once: {jobs}"
    assert max(running for _, running, _ in jobs.values()) <= n_jobs


@pytest.mark.slow
def test_the_submitit_launcher_runs_each_trial_in_its_own_process_two_at_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (extra [cluster])")
    result = klsweep("sweep=beta_target", "task=exact", "steps=4", *FAST,
                     "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2",
                     "hydra.sweeper.n_trials=4", "hydra.sweeper.report_every=1",
                     "hydra.sweeper.objectives={kl/final:null}",  # one objective: prunable
                     *job_log(tmp_path / "log", batch=2), sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load(tmp_path, "beta_target")
    assert states(study) == ["COMPLETE"] * 4
    # each run reported to the pruner from its own process, through the storage
    assert all(t.intermediate_values for t in study.trials)
    assert_own_processes_n_at_once(tmp_path / "log", n_trials=4, n_jobs=2)


@pytest.mark.slow
def test_trials_failing_in_submitit_processes_are_recorded_with_their_reasons(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (extra [cluster])")
    result = klsweep("sweep=beta_target", "steps=2", *FAST, *FAILING_GRID,
                     "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2",
                     sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = {(t.params["optim.lr"], t.params["algo.updates_per_rollout"]): t
              for t in load(tmp_path, "beta_target").trials}
    assert trials[3e-4, 1].state == trials[3e-4, 2].state == TrialState.COMPLETE
    raised, nan = trials[1e10, 1], trials[1e10, 2]
    assert raised.user_attrs["reason"].startswith("RuntimeError: probability tensor")
    assert (nan.user_attrs["reason"], nan.user_attrs["status"]) == ("loss is nan at step 0",
                                                                    "failed")
