"""The rules of running under Slurm, without a cluster: a run's ranks are its step's tasks, one
per device; the study and the sweep dir must be where the trials' nodes can see them; a run
stops after its step on Slurm's time-limit warning; ``hydra/launcher=submitit_slurm`` is
klsweep's launcher."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hydra_plugins.klsweep_slurm._checks import (
    SlurmConfigError,
    check_shared,
    node_local,
    sqlite_path,
)
from klsweep.checkpoint import GracefulStop
from klsweep.config import CONF_DIR
from klsweep.slurm import step_mismatch, tasks_mismatch, uniform_tasks_per_node

# /proc/mounts of a machine whose /scratch is in memory and whose /home is on NFS
MOUNTS = """\
overlay / overlay rw 0 0
tmpfs /scratch tmpfs rw 0 0
server:/export/home /home nfs4 rw 0 0
"""


def srun_env(ntasks: int, **more: str) -> dict[str, str]:
    """What srun puts in each task's environment (the variables Lightning reads)."""
    return {"SLURM_NTASKS": str(ntasks), "SLURM_TASKS_PER_NODE": str(ntasks),
            "SLURM_NNODES": "1", "SLURM_JOB_NAME": "python", "SLURM_PROCID": "0",
            "SLURM_STEP_ID": "0", **more}


# --- a run's ranks are its Slurm tasks ------------------------------------------------------------
@pytest.mark.parametrize(("listed", "count"), [("4", 4), ("4(x2)", 4), ("4,4", 4),
                                               ("2(x3),1", None), ("", None)])
def test_tasks_per_node_is_read_from_slurms_compressed_list(listed, count):
    assert uniform_tasks_per_node(listed) == count


def test_each_rank_needs_its_own_task_on_every_node():
    assert step_mismatch(2, 1, srun_env(2)) is None
    assert step_mismatch(2, 1, srun_env(1)) == (
        "trainer.devices=2 needs 2 Slurm tasks on each node, one per device, and the job has 1 "
        "(SLURM_NTASKS=1, SLURM_NNODES=1): set srun --ntasks-per-node=2, or trainer.devices=1")
    # a task too many would train a copy of the run in the same dir
    assert step_mismatch(1, 1, srun_env(2)) is not None
    assert "trainer.num_nodes=1 and the Slurm job has 2 nodes" in step_mismatch(
        2, 1, srun_env(4, SLURM_NNODES="2", SLURM_TASKS_PER_NODE="2(x2)"))
    assert step_mismatch(4, 2, srun_env(8, SLURM_NNODES="2", SLURM_TASKS_PER_NODE="4(x2)")) \
        is None


def test_in_a_batch_script_without_srun_only_a_one_device_run_may_start():
    batch_script = {k: v for k, v in srun_env(2).items() if k != "SLURM_STEP_ID"}
    assert step_mismatch(1, 1, batch_script) is None
    assert step_mismatch(2, 1, batch_script) == (
        "trainer.devices=2 × trainer.num_nodes=1 ranks are the tasks that srun starts, and this "
        "process is the batch script's own: run srun python -m klsweep ... in the script "
        "(SLURM_NTASKS=2)")


def test_outside_srun_and_in_an_interactive_allocation_nothing_is_checked():
    assert step_mismatch(4, 1, {}) is None
    assert step_mismatch(4, 1, srun_env(1, SLURM_JOB_NAME="interactive")) is None


def test_all_gpus_a_task_sees_is_left_to_lightning_to_count():
    assert tasks_mismatch(-1, 1, tasks=1, nodes=1, per_node=1, asked="", fix="") is None


def test_lightning_gets_slurms_environment_without_its_own_requeue(monkeypatch):
    from klsweep.trainer import slurm_environment

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert slurm_environment() is None
    for key, value in srun_env(2, SLURM_LOCALID="0", SLURM_NODEID="0").items():
        monkeypatch.setenv(key, value)
    environment = slurm_environment()
    assert environment.auto_requeue is False  # klsweep's checkpoint resumes a requeued job
    # srun --ntasks=2 on one node, which Lightning accepts with --ntasks-per-node only
    assert os.environ["SLURM_NTASKS_PER_NODE"] == "2"
    assert environment.world_size() == 2


# --- what the trials' nodes can see -------------------------------------------------------------
@pytest.mark.parametrize(("path", "where"), [
    ("/tmp/sweeps/a/optuna.db", "under /tmp"), ("/var/tmp/s", "under /var/tmp"),
    ("/dev/shm/s", "under /dev/shm"), ("/scratch/s/optuna.db", "on tmpfs"),
    ("/home/me/sweeps/a", None), ("/work/sweeps", None)])
def test_a_path_is_this_machines_alone_under_a_temporary_dir_or_in_memory(path, where,
                                                                           monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    assert node_local(Path(path), MOUNTS) == where


def test_tmpdir_is_this_machines_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "job-scratch"))
    assert node_local(tmp_path / "job-scratch" / "optuna.db", MOUNTS) is not None


def test_a_sqlite_study_only_this_machine_sees_is_refused_when_the_trials_run_elsewhere():
    paths = {"the SQLite study /tmp/s/optuna.db": Path("/tmp/s/optuna.db"),
             "hydra.sweep.dir=/home/me/s": Path("/home/me/s")}
    with pytest.raises(SlurmConfigError) as refused:
        check_shared(paths, None, nodes=["node01", "node02"], mounts=MOUNTS)
    assert str(refused.value) == (
        "the SQLite study /tmp/s/optuna.db is under /tmp, which only this machine sees, and the "
        "trials run on Slurm's nodes (node01, node02): put hydra.sweep.dir on a disk the nodes "
        "share, and the study there or in PostgreSQL "
        "(hydra.sweeper.storage=postgresql://USER@HOST/DB)")
    # a cluster of this machine alone sees what it sees
    check_shared(paths, None, nodes=["localhost"], mounts=MOUNTS)
    # a study on a shared disk is fine anywhere
    check_shared({"the SQLite study /home/me/s/optuna.db": Path("/home/me/s/optuna.db")}, None,
                 nodes=["node01"], mounts=MOUNTS)


def test_the_study_path_is_read_from_a_sqlite_url_also_through_an_environment_variable(
        monkeypatch):
    monkeypatch.setenv("KLSWEEP_DB", "sqlite:////tmp/study.db")
    assert sqlite_path("env:KLSWEEP_DB") == Path("/tmp/study.db")
    assert sqlite_path("sqlite:////srv/s.db") == Path("/srv/s.db")
    assert sqlite_path("postgresql://me@db/klsweep") is None


# --- the run's side -------------------------------------------------------------------------------
def test_slurms_time_limit_warning_stops_the_run_after_its_step_as_sigterm_does():
    with GracefulStop() as stop:
        signal.raise_signal(signal.SIGUSR2)  # sbatch --signal=USR2@N, submitit's choice
        assert stop.signal_name == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # the handler found is back


def test_submitit_slurm_composes_to_klsweeps_launcher_with_klsweeps_defaults():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (extra [cluster])")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.klsweep_slurm._launcher.KLSweepSlurmLauncher"
    assert (launcher.max_num_timeout, launcher.array_parallelism) == (3, 4)
    assert launcher.partition is None  # the plugin's own options are all there
