"""A run as a Slurm job step: what Slurm's environment says of the step this process is a task
of, and the rule that its tasks are the run's devices, one each (Lightning's SLURM environment
takes ranks from ``SLURM_PROCID`` and never starts a process of its own). The launcher of
``hydra/launcher=submitit_slurm`` checks the same rule on the tasks it will ask for."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# Lightning's rule: a job named so is an interactive allocation, whose processes are not ranks
INTERACTIVE_NAMES = ("bash", "interactive")


def step_tasks(env: Mapping[str, str] = os.environ) -> int | None:
    """How many tasks the Slurm step of this process has, as Lightning's SLURM environment
    sees it (``SLURM_NTASKS``); None outside Slurm or in an interactive allocation."""
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in INTERACTIVE_NAMES:
        return None
    return int(env["SLURM_NTASKS"])


def uniform_tasks_per_node(value: str) -> int | None:
    """The tasks on each node from ``SLURM_TASKS_PER_NODE`` ("4", "4(x2)", "4,4"), or None
    when the nodes have different counts ("2(x3),1")."""
    counts = set()
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x\d+\))?", part.strip())
        if match is None:
            return None
        counts.add(int(match[1]))
    return counts.pop() if len(counts) == 1 else None


def tasks_per_node(env: Mapping[str, str] = os.environ) -> int | None:
    """The step's tasks on each node: ``--ntasks-per-node`` where given, else how Slurm spread
    ``--ntasks`` (None when unevenly)."""
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"])
    return uniform_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""))


def tasks_mismatch(devices: int, num_nodes: int, *, tasks: int, nodes: int,
                   per_node: int | None, asked: str, fix: str) -> str | None:
    """Why ``tasks`` Slurm tasks on ``nodes`` nodes (``per_node`` on each) cannot run a run of
    ``trainer.devices`` × ``trainer.num_nodes`` ranks, one task per rank; None when they can.
    ``asked`` says how the tasks were asked for and ``fix`` the setting that asks for more
    (``--ntasks-per-node``), for the message. A ``devices`` of -1 (every GPU a task sees) is
    left to Lightning, which counts the GPUs."""
    if devices < 1:
        return None
    if num_nodes != nodes:
        return (f"trainer.num_nodes={num_nodes} and the Slurm job has {nodes} node"
                f"{'s' if nodes > 1 else ''} ({asked}): set trainer.num_nodes={nodes}")
    if per_node != devices or tasks != devices * num_nodes:
        shown = per_node if per_node is not None else f"{tasks} in all, unevenly"
        return (f"trainer.devices={devices} needs {devices} Slurm task"
                f"{'s' if devices > 1 else ''} on each node, one per device, and the job has "
                f"{shown} ({asked}): set {fix}={devices}, or "
                f"trainer.devices={per_node or tasks // max(nodes, 1)}")
    return None


def step_mismatch(devices: int, num_nodes: int,
                  env: Mapping[str, str] = os.environ) -> str | None:
    """``tasks_mismatch`` for the Slurm step this process is a task of (None outside Slurm).
    In a batch script itself (no ``SLURM_STEP_ID``: not a task srun started) Lightning still
    reads the job's tasks as ranks, and a run of several would wait for ranks never started."""
    tasks = step_tasks(env)
    if tasks is None:
        return None
    if "SLURM_STEP_ID" not in env:
        if devices * num_nodes <= 1:
            return None
        return (f"trainer.devices={devices} × trainer.num_nodes={num_nodes} ranks are the tasks "
                f"that srun starts, and this process is the batch script's own: run srun python "
                f"-m klsweep ... in the script (SLURM_NTASKS={tasks})")
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    return tasks_mismatch(devices, num_nodes, tasks=tasks, nodes=nodes,
                          per_node=tasks_per_node(env),
                          asked=f"SLURM_NTASKS={tasks}, SLURM_NNODES={nodes}",
                          fix="srun --ntasks-per-node")
