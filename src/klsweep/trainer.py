"""The Lightning ``Trainer`` arguments of the trainer group, with the strategies that need
the model: FSDP wraps each decoder layer of the policy in its own shard unit (and, on
request, checkpoints its activations)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from torch import nn


def decoder_layer_classes(policy: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of ``policy``: what transformers names as a model's
    unsplittable modules (``_no_split_modules``: LlamaDecoderLayer, Qwen2DecoderLayer,
    GPT2Block, ...), else the modules that declare themselves blocks (``is_decoder_layer``)."""
    names = set()
    for module in policy.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(m) for m in policy.modules()
               if type(m).__name__ in names or getattr(m, "is_decoder_layer", False)}
    if not classes:
        raise ValueError(f"trainer.strategy=fsdp needs a model with decoder layers to wrap "
                         f"({type(policy).__name__} declares none)")
    return classes


def trainer_arguments(trainer_cfg: Any, policy: nn.Module) -> dict[str, Any]:
    """Keyword arguments of ``lightning.Trainer`` for the trainer node."""
    args = OmegaConf.to_container(trainer_cfg, resolve=True)
    activation_checkpointing = args.pop("activation_checkpointing")
    if args["strategy"] == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        layers = decoder_layer_classes(policy)
        args["strategy"] = FSDPStrategy(
            auto_wrap_policy=layers,
            activation_checkpointing_policy=layers if activation_checkpointing else None)
    return args
