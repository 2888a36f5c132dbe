"""Policy models by name, as the ``model`` config group chooses them: each builds the policy
and its frozen reference for a task. The interface they implement is ``models/base.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from klsweep.models.base import Cache, CausalLM
from klsweep.models.hf import HFCausalLM, save_adapter
from klsweep.models.hf_build import HFModelConfig, build_hf
from klsweep.models.hf_build import load_tokenizer as hf_tokenizer
from klsweep.models.tiny import KVCache, TinyConfig, TinyGPT, build_tiny
from klsweep.schema import from_node
from klsweep.sharding import full_state_dict


@dataclass(frozen=True)
class ModelKind:
    """A ``model`` choice: its typed config, ``build(config, task) -> (policy, reference)``
    and, for models of text, ``tokenizer(config)`` (a text task is built with it)."""

    Config: type
    build: Callable[[Any, Any], tuple[nn.Module, nn.Module]]
    tokenizer: Callable[[Any], Any] | None = None


MODELS: dict[str, ModelKind] = {"tiny": ModelKind(TinyConfig, build_tiny),
                                "hf": ModelKind(HFModelConfig, build_hf, hf_tokenizer)}


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer of the model ``model_cfg`` names, or None (the synthetic tasks' models
    read token ids)."""
    kind = MODELS[model_cfg.kind]
    return None if kind.tokenizer is None else kind.tokenizer(from_node(kind.Config, model_cfg))


def export_policy(policy: nn.Module, run_dir: Path | None) -> None:
    """What a finished run leaves for use elsewhere, beside its checkpoints: a LoRA policy's
    adapter in ``run_dir/adapter`` (``PeftModel.from_pretrained(base, run_dir / "adapter")``);
    a full policy's weights are in the checkpoint already. A sharded policy's state
    (trainer=fsdp) is gathered by every rank; the ranks that do not write pass ``run_dir``
    None."""
    if isinstance(policy, HFCausalLM) and policy.is_lora:
        state = full_state_dict(policy, prefix="model.")
        if run_dir is not None:
            save_adapter(policy, run_dir / "adapter", state)


def default_lr(model_cfg: Any) -> float:
    """The learning rate ``optim.lr: null`` stands for with the model ``model_cfg`` names."""
    kind = MODELS[model_cfg.kind]
    return from_node(kind.Config, model_cfg).default_lr()


def build_models(model_cfg: Any, task: Any) -> tuple[nn.Module, nn.Module]:
    """The policy (trainable) and the reference (frozen) that ``model_cfg`` names."""
    kind = MODELS[model_cfg.kind]
    return kind.build(from_node(kind.Config, model_cfg), task)


__all__ = ["MODELS", "Cache", "CausalLM", "KVCache", "ModelKind", "TinyConfig", "TinyGPT",
           "build_models", "default_lr", "export_policy", "load_tokenizer"]
