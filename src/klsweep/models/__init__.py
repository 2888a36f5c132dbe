"""Policy models by name, as the ``model`` config group chooses them: each builds the policy
and its frozen reference for a task. The interface they implement is ``models/base.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from klsweep.models.base import Cache, CausalLM
from klsweep.models.tiny import KVCache, TinyGPT, TinyGPTConfig, build_tiny

# name -> build(model config node, task) -> (policy, reference)
MODELS: dict[str, Callable[[Any, Any], tuple[nn.Module, nn.Module]]] = {"tiny": build_tiny}


def build_models(model_cfg: Any, task: Any) -> tuple[nn.Module, nn.Module]:
    """The policy (trainable) and the reference (frozen) that ``model_cfg`` names."""
    return MODELS[model_cfg.name](model_cfg, task)


__all__ = ["MODELS", "Cache", "CausalLM", "KVCache", "TinyGPT", "TinyGPTConfig", "build_models"]
