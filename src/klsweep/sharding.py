"""``trainer=fsdp``: fully sharded data parallelism with torch's FSDP2 (``fully_shard``), under
Lightning's ``ModelParallelStrategy``.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 makes the whole LightningModule
its root unit and runs ``training_step`` inside the root's forward, while klsweep's
algorithms call backward within the step, which FSDP1's state machine refuses. FSDP2 shards
modules in place (their parameters become DTensors), and ``ModelParallelStrategy`` wraps
nothing: the module shards itself in ``configure_model`` and the step runs as under DDP.

What is sharded: each decoder layer of the policy is a unit and the policy the root unit (the
tied embedding and LM head live in the root); the frozen reference and the initial model
likewise, because a full copy of a frozen model on every rank would outweigh the policy's
sharded weights, gradients and AdamW state once there are more than four ranks (4 bytes a
parameter against 16 / world size); an algorithm's own module (PPO's value head) is one unit,
so that its gradient is reduced across ranks as the policy's is. Checkpoints hold full state
dicts gathered to rank 0 (one file, as every other strategy writes)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

# the model interface's entry points that do not pass through ``forward`` (models/base.py):
# FSDP gathers a unit's parameters around each of them as it does around ``forward``
ENTRY_POINTS = ("completion_logits", "completion_logits_and_hidden")


def shard_model(model: nn.Module, mesh: Any, layer_classes: set[type[nn.Module]],
                activation_checkpointing: bool = False) -> None:
    """Shard ``model`` in place over ``mesh``: each module of ``layer_classes`` its own unit,
    ``model`` the root unit around the rest. ``activation_checkpointing`` recomputes each
    layer's activations in backward (a trainable model only: a frozen one has no backward).
    A model without parameters of its own (a LoRA policy's reference) is left as it is."""
    if not any(p.numel() for p in model.parameters()):
        return
    if activation_checkpointing and any(p.requires_grad for p in model.parameters()):
        model.enable_checkpointing()  # the model's own: it knows what a recomputed pass needs
    for module in model.modules():
        if type(module) in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshards_root(model))
    for name in ENTRY_POINTS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def unsharded_trainable(models: Iterable[nn.Module]) -> list[str]:
    """Names of trainable parameters that are not sharded: nothing would reduce their
    gradients across ranks."""
    return [name for model in models for name, p in model.named_parameters()
            if p.requires_grad and not isinstance(p, DTensor)]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module, prefix: str = "") -> dict[str, Tensor] | None:
    """A sharded ``model``'s full state dict on rank 0, in CPU memory ({} on the other ranks,
    which must call it too: it gathers), its keys without ``prefix``; None for a model that
    is not sharded (its own ``state_dict()`` is full). A sharded module's ``state_dict()``
    holds its shards, even while it is gathered."""
    if not is_sharded(model):
        return None
    return {key.removeprefix(prefix): value for key, value in gathered_state(model).items()}


def _state_dict_api() -> Any:
    # torch.distributed.checkpoint takes 0.1 s to import: only runs that shard pay for it
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _full_on_rank_zero() -> Any:
    """A full state on rank 0 only, in CPU memory: what one file of a checkpoint holds."""
    return _state_dict_api().StateDictOptions(full_state_dict=True, cpu_offload=True)


def gathered_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s full state dict on rank 0, in CPU memory ({} on the other ranks, which
    must call it too: it gathers)."""
    return _state_dict_api().get_model_state_dict(model, options=_full_on_rank_zero())


def gathered_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The full state of ``optimizer`` over ``model``'s parameters, keyed by parameter name,
    on rank 0 ({} elsewhere; every rank calls it)."""
    return _state_dict_api().get_optimizer_state_dict(model, optimizer,
                                                      options=_full_on_rank_zero())


def scatter_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a full optimizer ``state`` (``gathered_optimizer_state``'s, read by every rank):
    each rank keeps its shards."""
    api = _state_dict_api()
    api.set_optimizer_state_dict(model, optimizer, state,
                                 options=api.StateDictOptions(full_state_dict=True))


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every unit of a sharded ``model`` gathered once for the whole block rather than at
    each forward (token-by-token decoding would gather every layer at every token), and
    sharded again after it. Holds the full weights meanwhile; an unsharded model passes
    through."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(reshards_root(model), recurse=False)


def reshards_root(model: nn.Module) -> bool:
    """Whether the root unit of ``model`` frees its gathered parameters after forward: a
    frozen model's does; a trained one's stay gathered until its backward, which needs them
    at once (FSDP's own choice for a root)."""
    return not any(p.requires_grad for p in model.parameters())
