"""The model interface: what the rest of klsweep uses of a policy or reference model.

Token batches are ``tokens`` [B, T] (long) with an optional ``attention_mask`` [B, T] (bool,
False on left padding; None: no padding). Every implementation (``models/tiny.py``,
``models/hf.py``) is an ``nn.Module`` with these methods, so sampling, scoring and the
algorithms never ask which model they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


def padded_positions(attention_mask: Tensor, length: int) -> Tensor:
    """Position ids [B, length] of the last ``length`` tokens: a left-padded row counts its
    real tokens only (as transformers' generate: cumsum − 1, clamped at 0 on padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -length:]


def in_row_chunks(fn: Callable[[Tensor, Tensor | None], tuple[Tensor, ...]], tokens: Tensor,
                  attention_mask: Tensor | None, rows: int) -> tuple[Tensor, ...]:
    """``fn(tokens, attention_mask)`` on chunks of ``rows`` rows, each of its outputs
    concatenated: a pass without gradient in bounded memory."""
    token_chunks = tokens.split(rows)
    mask_chunks = ((None,) * len(token_chunks) if attention_mask is None
                   else attention_mask.split(rows))
    parts = [fn(t, m) for t, m in zip(token_chunks, mask_chunks, strict=True)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


class Cache(Protocol):
    """Keys and values of the sequences decoded so far."""

    def repeat_interleave(self, repeats: int, max_len: int) -> Cache:
        """The cache of each sequence copied ``repeats`` times (one prompt's prefill shared
        by its group of completions), with room for ``max_len`` tokens. A prefill's cache
        then needs room for the prompt only: the copy is the one that decoding fills."""
        ...


@runtime_checkable
class CausalLM(Protocol):
    """A causal language model as klsweep uses it."""

    vocab_size: int
    hidden_size: int

    def __call__(self, tokens: Tensor, attention_mask: Tensor | None = None,
                 cache: Cache | None = None, *, last_only: bool = False) -> Tensor:
        """Logits [B, T, vocab] of the next token at every position of ``tokens`` ([B, 1,
        vocab] of the last one with ``last_only``: a prefill needs no more, and at a large
        vocabulary the others are the memory peak). With a cache, ``tokens`` continue the
        cached sequences (``attention_mask`` then covers the cached and the new positions)
        and the cache grows by T."""
        ...

    def new_cache(self, batch_size: int, max_len: int) -> Cache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        ...

    def completion_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int, group_size: int = 1) -> Tensor:
        """Raw logits [B, N, vocab] that predict the completion tokens ``tokens[:,
        prompt_len:]``, with gradient when enabled. Rows come in consecutive groups of
        ``group_size`` that share a prompt, which an implementation may compute once."""
        ...

    def completion_logits_and_hidden(self, tokens: Tensor, attention_mask: Tensor | None,
                                     prompt_len: int,
                                     group_size: int = 1) -> tuple[Tensor, Tensor]:
        """``completion_logits`` and, from the same forward pass, the final hidden states
        [B, N, hidden_size] that the output head read to make them (the states a value
        head reads): one pass of the trunk where a critic needs both."""
        ...
