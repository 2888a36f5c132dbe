"""Checks of a Slurm sweep's settings, in the sweep's process before its study opens and before
any job: each fails in one line.

* A trial's ranks are its job's Slurm tasks, one per device (``klsweep.slurm``'s rule), on
  ``hydra.launcher.nodes`` × ``tasks_per_node``.
* Slurm accepts the trials' job: ``sbatch --test-only`` of the very script the jobs are
  submitted with checks the partition, account, QOS, time limit and resources, and its own
  message says what it refused.
* The jobs can reach the study and the sweep dir. The rule: a path under /tmp, /var/tmp,
  /dev/shm, /run or $TMPDIR, or on a file system in memory (tmpfs, ramfs), is seen by the
  machine that wrote it only; it is refused for a SQLite study, and for the sweep dir (where
  the jobs read their pickled call and write their results and run dirs), unless every node
  of the trials' partition is this machine (a one-node cluster, as scripts/slurm_local.sh
  starts). Any other path is taken to be shared, as a cluster's home and project disks are:
  klsweep cannot tell a node's local disk from a network one by its path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from klsweep.slurm import tasks_mismatch
from klsweep.storage import resolve_storage

NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")


class SlurmConfigError(ValueError):
    """A Slurm sweep that cannot run as set; the message is one line."""


def check_before_jobs(params: Mapping[str, Any], config: DictConfig,
                      executor: Callable[[], Any]) -> None:
    """Every check above; ``executor`` builds submitit's executor of the trials' jobs."""
    for command in ("sbatch", "srun"):
        if shutil.which(command) is None:
            raise SlurmConfigError(f"hydra/launcher=submitit_slurm submits the trials with "
                                   f"Slurm's {command}, which is not on this machine's PATH")
    trainer = config.get("trainer")
    if trainer is not None:
        nodes, per_node = int(params["nodes"]), int(params["tasks_per_node"])
        mismatch = tasks_mismatch(
            int(trainer.devices), int(trainer.get("num_nodes", 1)), tasks=nodes * per_node,
            nodes=nodes, per_node=per_node, fix="hydra.launcher.tasks_per_node",
            asked=f"hydra.launcher.nodes={nodes}, hydra.launcher.tasks_per_node={per_node}")
        if mismatch is not None:
            raise SlurmConfigError(mismatch)
    refusal = test_submit(executor())
    if refusal is not None:
        raise SlurmConfigError(f"Slurm refuses the trials' jobs{settings_shown(params)}: "
                               f"{refusal}")
    check_shared(shared_paths(config), params.get("partition"))


def settings_shown(params: Mapping[str, Any]) -> str:
    """The settings Slurm most often refuses, as the user set them."""
    keys = ("partition", "account", "qos", "gres", "constraint")
    shown = [f"hydra.launcher.{key}={params[key]}" for key in keys if params.get(key)]
    return f" ({', '.join(shown)})" if shown else ""


def test_submit(executor: Any) -> str | None:
    """Slurm's reason for refusing the trials' job script, in its own words; None when it
    would run it (``sbatch --test-only`` submits nothing)."""
    script = executor._executor._make_submission_file_text("true", "test-only")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
    try:
        done = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "sbatch --test-only did not answer in 60 s"
    finally:
        os.unlink(f.name)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix("sbatch: error: ") if lines else f"exit {done.returncode}"


# --- what the nodes can see ------------------------------------------------------------------
def shared_paths(config: DictConfig) -> dict[str, Path]:
    """What the trials' jobs read and write, by how the message names it: the SQLite study
    (``hydra.sweeper.storage``; null: optuna.db in the sweep dir) and the sweep dir."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    paths = {}
    sweeper = config.hydra.get("sweeper") or {}
    if "storage" in sweeper:
        storage = sweeper.get("storage")
        database = sweep_dir / "optuna.db" if storage is None else sqlite_path(storage)
        if database is not None:
            paths[f"the SQLite study {database}"] = database
    paths[f"hydra.sweep.dir={sweep_dir}"] = sweep_dir
    return paths


def sqlite_path(storage: str) -> Path | None:
    try:
        url = make_url(resolve_storage(storage))
    except (ValueError, ArgumentError):  # the sweeper says what is wrong with it
        return None
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    return Path(url.database).absolute()


def node_local(path: Path, mounts: str | None = None) -> str | None:
    """Where ``path`` lies that only this machine sees (see the module's rule), or None.
    ``mounts`` is the text of /proc/mounts (read when not given)."""
    path = path.resolve()
    tmpdir = os.environ.get("TMPDIR", "").rstrip("/")
    for directory in {*NODE_LOCAL_DIRS, *((tmpdir,) if tmpdir else ())}:
        if path.is_relative_to(Path(directory).resolve()):
            return f"under {directory}"
    kind = file_system(path, mounts)
    return f"on {kind}" if kind in MEMORY_FILE_SYSTEMS else None


def file_system(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system ``path`` is on: the mount with the longest prefix."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:  # not Linux
            return None
    best, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and path.is_relative_to(fields[1]) and len(fields[1]) > best:
            best, kind = len(fields[1]), fields[2]
    return kind


def partition_nodes(partition: str | None) -> list[str]:
    """The host names of the nodes of ``partition`` (None: Slurm's default partition)."""
    command = ["sinfo", "--noheader", "--format=%P|%N"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    lists = []
    for line in done.stdout.splitlines():
        name, _, nodes = line.partition("|")
        if (name.rstrip("*") == partition) if partition else name.endswith("*"):
            lists.append(nodes.strip())
    names = []
    for node_list in filter(None, lists):
        expanded = subprocess.run(["scontrol", "show", "hostnames", node_list],
                                  capture_output=True, text=True, timeout=60)
        names += expanded.stdout.split() or [node_list]
    return names


def this_machine() -> set[str]:
    host = socket.gethostname()
    return {host, host.split(".")[0], socket.getfqdn(), "localhost"}


def check_shared(paths: Mapping[str, Path], partition: str | None,
                 nodes: list[str] | None = None, mounts: str | None = None) -> None:
    """Refuse the first path that only this machine sees, unless the partition's nodes are all
    this machine. ``nodes`` and ``mounts`` are asked of Slurm and /proc when not given."""
    local = [(what, where) for what, path in paths.items()
             if (where := node_local(path, mounts)) is not None]
    if not local:
        return
    nodes = partition_nodes(partition) if nodes is None else nodes
    if nodes and set(nodes) <= this_machine():
        return
    what, where = local[0]
    shown = ", ".join(nodes[:3]) + (", ..." if len(nodes) > 3 else "") or "unknown"
    raise SlurmConfigError(
        f"{what} is {where}, which only this machine sees, and the trials run on Slurm's nodes "
        f"({shown}): put hydra.sweep.dir on a disk the nodes share, and the study there or in "
        f"PostgreSQL (hydra.sweeper.storage=postgresql://USER@HOST/DB)")
