"""Tasks by name, as the ``task`` config group chooses them. Each task class names its typed
config dataclass as ``Config``; a task on text (``needs_tokenizer``) also gets the model's
tokenizer, and a task with a held-out evaluation (``needs_evaluation``) the ``eval`` node."""

from __future__ import annotations

from typing import Any

from klsweep.schema import from_node
from klsweep.tasks.base import Task
from klsweep.tasks.digits import DigitsTask
from klsweep.tasks.evaluation import EvalConfig
from klsweep.tasks.exact import ExactTask
from klsweep.tasks.reasoning import ReasoningTask
from klsweep.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {"digits": DigitsTask, "exact": ExactTask, "text": TextTask,
                                "reasoning": ReasoningTask}


def build_task(cfg: Any, tokenizer: Any = None, evaluation: Any = None) -> Task:
    """The task the ``task`` node names; ``evaluation`` is the ``eval`` node (None: the
    task evaluates as it does without one)."""
    task_cls = TASKS[cfg.name]
    kwargs: dict[str, Any] = {}
    if task_cls.needs_tokenizer:
        kwargs["tokenizer"] = tokenizer
    if task_cls.needs_evaluation and evaluation is not None:
        kwargs["evaluation"] = from_node(EvalConfig, evaluation)
    return task_cls(from_node(task_cls.Config, cfg), **kwargs)


__all__ = ["TASKS", "EvalConfig", "Task", "build_task"]
