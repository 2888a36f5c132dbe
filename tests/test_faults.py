"""Faults that must neither lose data nor hang: W&B out of reach, a checkpoint that cannot be
written, a damaged reference cache, two sweeps started at once on one SQLite study."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState
from torch import nn

from hydra_plugins.klsweep_optuna._study import lost_creation_race, make_storage
from klsweep.checkpoint import CheckpointError
from klsweep.models.reference import cached_model
from klsweep.records import read_metrics, resume_metrics
from tests.conftest import REPO, TINY, run_klsweep
from tests.test_resume import run_here


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_wandb_server_costs_seconds_and_the_run_logs_offline(tmp_path):
    # credentials set and WANDB_MODE unset: klsweep goes online, where wandb alone would
    # wait init_timeout (90 s) for a server that is not there
    url = f"http://127.0.0.1:{closed_port()}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_API_KEY="f" * 40, WANDB_BASE_URL=url, WANDB_SILENT="true")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "klsweep", *TINY, "logger=wandb",
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the server was probed first, so no online start was tried: that start is the wait
    assert (f"klsweep: W&B at {url} is unreachable: logging offline (wandb sync "
            f"{run_dir / 'wandb'} uploads it later)") in result.stdout
    assert "did not start online" not in result.stdout + result.stderr
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [p.name.endswith(f"-{run_id}")
            for p in (run_dir / "wandb").glob("offline-run-*")] == [True]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_at_a_checkpoint_ends_the_run_in_one_clear_line_with_its_metrics_intact(
        tmp_path):
    # the checkpoint's temporary file leads to /dev/full, where every write fails with ENOSPC
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt.tmp").symlink_to("/dev/full")
    result = run_klsweep(*TINY, "steps=6", "logger=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    reason = (f"cannot write the checkpoint {checkpoints / 'last.ckpt'}: [Errno 28] No space "
              f"left on device; metrics.jsonl holds every step so far")
    [line] = [line for line in result.stdout.splitlines() if "klsweep:" in line]
    assert line.startswith("klsweep: grpo-k3-adaptive-s0 failed after 2/6 steps")
    assert line.endswith(f"({reason})")
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == reason
    assert not (checkpoints / "last.ckpt.tmp").exists()  # the partial file is gone


def test_a_half_written_last_line_is_cut_from_the_record_a_resumed_run_appends_to(tmp_path):
    # killed while writing the row of the checkpoint's own step: nothing lies beyond the
    # checkpoint to cut, but the fragment must go, or the next row is appended to it
    record = tmp_path / "metrics.jsonl"
    record.write_text('{"step": 0, "kl/mean": 0.1}\n{"step": 1, "kl/mean": 0.2}\n{"step": 2, "kl')
    rows, last = resume_metrics(record, 2, rewrite=True)
    assert [row["step"] for row in rows] == [0, 1] and last == 1
    assert record.read_text() == '{"step": 0, "kl/mean": 0.1}\n{"step": 1, "kl/mean": 0.2}\n'


def test_an_unwritable_checkpoint_dir_ends_the_run_with_its_metrics_intact(tmp_path):
    # a file where the checkpoints dir should be: no directory can be made there, root or not
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("")
    with pytest.raises(CheckpointError, match=r"^cannot write the checkpoint .*last\.ckpt: "
                                              r"\[Errno 17\] File exists"):
        run_here(run_dir, [*TINY, "steps=6", "logger=none"])
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("damage", ["truncated", "not a torch file"])
def test_a_damaged_reference_cache_file_is_retrained_not_a_crash(damage, tmp_path, caplog):
    trained = []

    def train(model: nn.Module) -> None:
        trained.append(model)
        nn.init.constant_(model.weight, 0.5)

    key = {"task": "digits", "language": {"p_step": 0.6}}
    cached_model(tmp_path, key, nn.Linear(3, 2), train)
    [path] = tmp_path.glob("digits-*.pt")
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2] if damage == "truncated" else b"nonsense")
    model = cached_model(tmp_path, key, nn.Linear(3, 2), train)
    assert len(trained) == 2 and torch.all(model.weight == 0.5)
    assert f"the cached reference {path} is unreadable" in caplog.text
    # the cache is whole again: the next run loads it
    cached_model(tmp_path, key, nn.Linear(3, 2), train)
    assert len(trained) == 2


@pytest.mark.slow
def test_two_sweeps_started_at_once_on_one_sqlite_study_end_with_exactly_n_trials(tmp_path):
    args = [sys.executable, "-m", "klsweep", "-m", "sweep=beta_target", "task=exact",
            "steps=2", "logger=none", "trainer.enable_progress_bar=false",
            "algo.prompts_per_step=2", "algo.group_size=2", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=10",
            f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    workers = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)
    trials = optuna.load_study(study_name="beta_target",
                               storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # a trial asked by both at once past n_trials is closed as surplus, never run
    assert all(t.user_attrs["reason"].startswith("surplus")
               for t in trials if t.state == TrialState.FAIL)


def sqlite_error(tmp_path: Path, *statements: str) -> sqlalchemy.exc.DBAPIError:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'race.db'}")
    with pytest.raises(sqlalchemy.exc.DBAPIError) as raised, engine.begin() as connection:
        for statement in statements:
            connection.execute(sqlalchemy.text(statement))
    engine.dispose()
    return raised.value


def test_only_a_table_made_first_by_another_worker_counts_as_alost_creation_race(tmp_path):
    made_twice = sqlite_error(tmp_path, "CREATE TABLE studies (id INTEGER)",
                              "CREATE TABLE studies (id INTEGER)")
    assert isinstance(made_twice, sqlalchemy.exc.OperationalError)
    assert lost_creation_race(made_twice)
    missing = sqlite_error(tmp_path, "SELECT * FROM trials")
    assert isinstance(missing, sqlalchemy.exc.OperationalError)
    assert not lost_creation_race(missing)


def open_storage(url: str) -> str:
    make_storage(url, heartbeat_interval=1, grace_period=10, max_retry=3)
    return "opened"


def test_workers_opening_one_fresh_sqlite_storage_at_once_all_open_it(tmp_path):
    # before the race was handled, one fresh database in ten failed a worker here
    urls = [f"sqlite:///{tmp_path / f'optuna-{n}.db'}" for n in range(10)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        for url in urls:
            assert pool.map(open_storage, [url] * 4) == ["opened"] * 4
