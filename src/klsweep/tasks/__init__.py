"""Tasks by name, as the ``task`` config group chooses them. Each task class names its typed
config dataclass as ``Config``; a task on text (``needs_tokenizer``) also gets the model's
tokenizer."""

from __future__ import annotations

from typing import Any

from klsweep.schema import from_node
from klsweep.tasks.base import Task
from klsweep.tasks.digits import DigitsTask
from klsweep.tasks.exact import ExactTask
from klsweep.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {"digits": DigitsTask, "exact": ExactTask, "text": TextTask}


def build_task(cfg: Any, tokenizer: Any = None) -> Task:
    task_cls = TASKS[cfg.name]
    config = from_node(task_cls.Config, cfg)
    return task_cls(config, tokenizer) if task_cls.needs_tokenizer else task_cls(config)


__all__ = ["TASKS", "Task", "build_task"]
