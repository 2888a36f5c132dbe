"""Tasks by name, as the ``task`` config group chooses them. Each task class names its typed
config dataclass as ``Config``."""

from __future__ import annotations

from typing import Any

from klsweep.schema import from_node
from klsweep.tasks.base import Task
from klsweep.tasks.digits import DigitsTask
from klsweep.tasks.exact import ExactTask

TASKS: dict[str, type[Task]] = {"digits": DigitsTask, "exact": ExactTask}


def build_task(cfg: Any) -> Task:
    task_cls = TASKS[cfg.name]
    return task_cls(from_node(task_cls.Config, cfg))


__all__ = ["TASKS", "Task", "build_task"]
