"""Which GPUs each trial of a sweep runs on: a pure function of the GPUs the sweep may use and
what one trial needs, so a node's GPUs fill with trials and no two trials share a GPU unless
the user asks for it (``hydra.launcher.trials_per_gpu``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig

DeviceSlot = tuple[str, ...]  # the GPU ids one running trial sees as CUDA_VISIBLE_DEVICES


class PlacementError(ValueError):
    """A trial that cannot be placed on the GPUs at hand; the message is one line."""


def device_slots(gpu_ids: Sequence[str], gpus_per_trial: int,
                 trials_per_gpu: int = 1) -> list[DeviceSlot]:
    """The device sets of the trials that run at once: consecutive groups of
    ``gpus_per_trial`` GPUs (a trial's GPUs stay neighbours, as NVLink islands usually are),
    the whole list repeated ``trials_per_gpu`` times when one-GPU trials may share a GPU (so
    the first trials spread over every GPU before any two share one). Empty when the
    trials use no GPU."""
    if gpus_per_trial == 0 or not gpu_ids:
        return []
    if gpus_per_trial > len(gpu_ids):
        raise PlacementError(f"a trial needs {gpus_per_trial} GPUs (trainer.devices) and the "
                             f"sweep may use {len(gpu_ids)} ({','.join(gpu_ids)})")
    if trials_per_gpu > 1 and gpus_per_trial > 1:
        raise PlacementError(f"hydra.launcher.trials_per_gpu={trials_per_gpu} shares a GPU "
                             f"between one-GPU trials, and a trial needs {gpus_per_trial}")
    groups = [tuple(gpu_ids[i:i + gpus_per_trial])
              for i in range(0, len(gpu_ids) - gpus_per_trial + 1, gpus_per_trial)]
    return [group for _ in range(trials_per_gpu) for group in groups]  # spread before sharing


def gpus_per_trial(config: DictConfig, n_gpus: int) -> int:
    """GPUs one trial's Trainer takes: none on the CPU, ``trainer.devices`` otherwise (-1: all
    the sweep may use, so trials run one at a time)."""
    trainer = config.get("trainer", {})
    if str(trainer.get("accelerator", "cpu")) == "cpu" or n_gpus == 0:
        return 0
    devices = int(trainer.get("devices", 1))
    return n_gpus if devices == -1 else devices


def visible_gpu_ids(count: int) -> list[str]:
    """The ids of the GPUs this process sees, as a child's CUDA_VISIBLE_DEVICES names them:
    the parent's own CUDA_VISIBLE_DEVICES where a scheduler set it, else 0 … count−1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in (part.strip() for part in listed.split(",")) if gpu][:count]
    return [str(i) for i in range(count)]
