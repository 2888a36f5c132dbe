"""The Lightning ``Trainer`` arguments of the trainer group, with the strategy that needs the
model: ``trainer=fsdp`` shards each decoder layer of the policy in its own FSDP unit (and, on
request, checkpoints its activations); the module applies the plan (``klsweep.sharding``).
Under ``srun`` the ranks are Slurm's tasks, through Lightning's SLURM environment."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import OmegaConf
from torch import nn

from klsweep.sharding import (
    gathered_optimizer_state,
    gathered_state,
    scatter_optimizer_state,
    shard_model,
    unsharded_trainable,
)
from klsweep.slurm import step_tasks, tasks_per_node


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


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) as plain FSDP: every rank a data-parallel
    rank, no tensor parallelism; the sharding plan of the trainer group (the decoder layer
    classes, activation checkpointing), which the module applies in ``configure_model``; and
    full optimiser states keyed by parameter name, gathered to rank 0 and scattered back."""

    def __init__(self, layer_classes: set[type[nn.Module]],
                 activation_checkpointing: bool = False) -> None:
        super().__init__(save_distributed_checkpoint=False)
        self.layer_classes = layer_classes
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, policy: nn.Module, frozen: Iterable[nn.Module | None],
              own: nn.Module | None) -> None:
        """Shard the policy (with the layer plan), the frozen models and an algorithm's own
        module (PPO's value head); refuse to train a trainable parameter left out."""
        # FSDP2 warns of each unit's output that is a view (a slice of the logits): an in-place
        # op on it would skip a gather in backward; klsweep's passes take none (their numbers
        # are DDP's: tests/test_fsdp.py)
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        mesh = self.device_mesh["data_parallel"]
        shard_model(policy, mesh, self.layer_classes, self.activation_checkpointing)
        for model in frozen:
            if model is not None:
                shard_model(model, mesh, self.layer_classes)
        if own is not None:
            shard_model(own, mesh, set())
        left = unsharded_trainable([policy] if own is None else [policy, own])
        if left:
            raise RuntimeError(f"trainer.strategy=fsdp left trainable parameters unsharded "
                               f"({', '.join(left[:3])}): nothing would reduce their gradients")

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state, on rank 0 (empty elsewhere), of the module's children that
        training changes: a frozen reference is not gathered only to be left out."""
        module = self.lightning_module
        state = {}
        for name in module.trained_children():
            child = gathered_state(getattr(module, name))
            state.update({f"{name}.{key}": value for key, value in child.items()})
        return state

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The full optimiser state keyed by parameter name, on rank 0 (empty elsewhere)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
        return gathered_optimizer_state(self.model, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each rank keeps its shards of the full states ``optimizer_state`` saved (every
        rank has read the checkpoint)."""
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"],
                                    strict=True):
            scatter_optimizer_state(self.model, optimizer, state)


def slurm_environment() -> SLURMEnvironment | None:
    """Lightning's SLURM environment for a run that is a Slurm job step (``srun``), with its
    requeue on SIGUSR1 off: klsweep's own checkpoint resumes a requeued run, and Lightning's
    (the whole module, saved on that signal) would be loaded over it by the next fit.
    Lightning refuses ``srun --ntasks=N`` without ``--ntasks-per-node`` (which says how many
    tasks each node runs): where Slurm spread the tasks evenly, SLURM_TASKS_PER_NODE says it,
    and is passed on as ``SLURM_NTASKS_PER_NODE``."""
    if step_tasks() is None:
        return None
    if "SLURM_NTASKS_PER_NODE" not in os.environ:
        per_node = tasks_per_node()
        if per_node is not None:
            os.environ["SLURM_NTASKS_PER_NODE"] = str(per_node)
    return SLURMEnvironment(auto_requeue=False)


def trainer_arguments(trainer_cfg: Any, policy: nn.Module) -> dict[str, Any]:
    """Keyword arguments of ``lightning.Trainer`` for the trainer node."""
    args = OmegaConf.to_container(trainer_cfg, resolve=True)
    activation_checkpointing = args.pop("activation_checkpointing")
    if args["strategy"] == "fsdp":
        args["strategy"] = FullyShardedStrategy(decoder_layer_classes(policy),
                                                activation_checkpointing)
    environment = slurm_environment()
    if environment is not None:
        args["plugins"] = [environment]
    return args
