"""Tasks by name, as the ``task`` config group chooses them."""

from __future__ import annotations

from dataclasses import fields

from omegaconf import DictConfig

from klsweep.tasks.base import Task
from klsweep.tasks.digits import DigitsConfig, DigitsTask
from klsweep.tasks.exact import ExactConfig, ExactTask

TASKS: dict[str, tuple[type[Task], type]] = {"digits": (DigitsTask, DigitsConfig),
                                             "exact": (ExactTask, ExactConfig)}


def build_task(cfg: DictConfig) -> Task:
    task_cls, config_cls = TASKS[cfg.name]
    return task_cls(config_cls(**{f.name: cfg[f.name] for f in fields(config_cls)}))


__all__ = ["TASKS", "Task", "build_task"]
