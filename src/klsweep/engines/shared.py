"""How the trainer and its engine process (``rollout.lag`` > 0) exchange data: the policy's
weights through a ring of shared-memory slots, everything else as bytes.

The weights of step v go to slot v mod S, written in place by the trainer (one copy) and read
in place by the engine, which copies them into its model when it takes the message that
names the slot (messages are taken in order). With S = lag + 2 the trainer never overwrites
a slot the engine has yet to read: when the trainer writes the weights of step v, it has
received the rollout of step v − 2, which the engine sampled after reading the weights of
step v − 2 − lag, the last ones in that slot.

Why not torch's own sharing of tensors through a queue: it moves each tensor to a new
shared-memory segment at every send and passes its file descriptor through a socket served
by the sender, which an engine killed mid-transfer leaves with a traceback in the trainer's
output and which costs a segment per parameter per step.
"""

from __future__ import annotations

import io
from dataclasses import fields
from multiprocessing import shared_memory
from typing import Any

import torch
from torch import Tensor

from klsweep.rollout import Prompts, Rollout

_ALIGN = 64  # bytes: each tensor starts on a cache line

Layout = list[tuple[str, str, tuple[int, ...], int]]


class WeightRing:
    """``slots`` copies of one payload of named tensors (their names, dtypes and shapes fixed
    by the first payload) in one shared-memory segment."""

    def __init__(self, name: str | None, layout: Layout, slot_bytes: int, slots: int) -> None:
        create = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=create,
                                              size=slot_bytes * slots if create else 0)
        self.layout, self.slot_bytes, self.slots, self.owner = layout, slot_bytes, slots, create

    @classmethod
    def for_payload(cls, named: dict[str, Tensor], slots: int) -> WeightRing:
        layout, offset = [], 0
        for name, tensor in named.items():
            layout.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                           offset))
            offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        return cls(None, layout, max(offset, _ALIGN), slots)

    @property
    def handle(self) -> tuple[str, Layout, int, int]:
        """What the engine process attaches with (``WeightRing(*handle)``)."""
        return self.shm.name, self.layout, self.slot_bytes, self.slots

    def views(self, slot: int) -> dict[str, Tensor]:
        """The tensors of ``slot``, in the shared memory itself."""
        base = slot * self.slot_bytes
        out = {}
        for name, dtype, shape, offset in self.layout:
            count = int(torch.Size(shape).numel())
            flat = (torch.frombuffer(self.shm.buf, dtype=getattr(torch, dtype), count=count,
                                     offset=base + offset) if count else
                    torch.empty(0, dtype=getattr(torch, dtype)))
            out[name] = flat.view(shape)
        return out

    @torch.no_grad()
    def write(self, slot: int, named: dict[str, Tensor]) -> None:
        views = self.views(slot)
        for name, tensor in named.items():
            views[name].copy_(tensor.detach())

    def close(self) -> None:
        """Unmap (the trainer, which made it, also unlinks it); tensors still viewing it keep
        their pages until they go."""
        try:
            self.shm.close()
        except BufferError:  # a view is alive: the mapping goes when it does
            pass
        if self.owner:
            self.shm.unlink()


def encode(value: Any) -> bytes:
    """Tensors (in dicts, lists, tuples) as bytes: copied, not shared."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def state_of(value: Rollout | Prompts) -> dict[str, Any]:
    """A rollout's or a batch of prompts' fields as plain values (what a checkpoint holds and
    ``encode`` takes); ``type(value)(**state_of(value))`` is the value again."""
    return {f.name: getattr(value, f.name) for f in fields(value)}
