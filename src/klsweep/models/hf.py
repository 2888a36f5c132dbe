"""Any transformers causal LM as a klsweep model (``model=hf``): ``HFCausalLM`` adapts a
transformers model (or a peft LoRA model around one) to the interface of ``models/base.py``;
``AdapterDisabled`` is a LoRA policy's reference, the same weights with the adapter off (no
second copy in memory, as TRL). Building them from the config: ``models/hf_build.py``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from klsweep.models.base import in_row_chunks, padded_positions

if TYPE_CHECKING:
    from transformers import DynamicCache

# transformers and peft are imported where they are used: importing transformers takes ~3 s,
# which every run with model=tiny would otherwise pay


class HFCache:
    """A transformers ``DynamicCache`` as the interface's ``Cache``."""

    def __init__(self, inner: DynamicCache) -> None:
        self.inner = inner

    def repeat_interleave(self, repeats: int, max_len: int) -> HFCache:
        # a DynamicCache grows as it is filled: max_len is unused
        # batch_repeat_interleave rebinds each layer's tensors in place: repeat a copy whose
        # layers are copies, so that this cache keeps its own batch
        new = copy.copy(self.inner)
        new.layers = [copy.copy(layer) for layer in self.inner.layers]
        new.batch_repeat_interleave(repeats)
        return HFCache(new)


class HFCausalLM(nn.Module):
    """A transformers causal LM (``self.model``, possibly a peft model) behind klsweep's
    model interface."""

    def __init__(self, model: nn.Module, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab_size: int = model.config.vocab_size
        self.hidden_size: int = model.config.hidden_size
        self.chunk_rows = chunk_rows
        self.checkpointing = False
        # transformers 5.24 renamed forward's past_key_values to cache; an unknown keyword
        # lands in **kwargs unread, and the model would run without its cache
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = ("cache" if "cache" in inspect.signature(base.forward).parameters
                           else "past_key_values")

    def _output(self, tokens: Tensor, attention_mask: Tensor | None, cache: HFCache | None,
                keep: int, **kwargs: Any) -> Any:
        """The model's output on ``tokens``; logits of the last ``keep`` positions only (0:
        all), so that [B, T, vocab] is never made when fewer are needed."""
        if attention_mask is not None:
            kwargs.update(attention_mask=attention_mask.long(),
                          position_ids=padded_positions(attention_mask, tokens.shape[1]))
        kwargs[self._cache_arg] = None if cache is None else cache.inner
        return self.model(input_ids=tokens, use_cache=cache is not None, logits_to_keep=keep,
                          **kwargs)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None,
                cache: HFCache | None = None, *, last_only: bool = False) -> Tensor:
        """Logits [B, T, vocab] ([B, 1, vocab] of the last position with ``last_only``);
        with a cache, ``tokens`` continue the cached sequences and ``attention_mask`` covers
        the cached and the new positions."""
        return self._output(tokens, attention_mask, cache, keep=1 if last_only else 0).logits

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        """An empty cache; a DynamicCache grows as it is filled, so ``max_len`` is unused."""
        from transformers import DynamicCache

        return HFCache(DynamicCache(config=self.model.config))

    def completion_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int, group_size: int = 1) -> Tensor:
        """Logits [B, N, vocab] predicting ``tokens[:, prompt_len:]``. With ``group_size``
        > 1 each shared prompt is computed once, its keys and values (with gradient)
        repeated for its group, except under gradient checkpointing, which refuses a cache."""
        return self._by_chunks(lambda t, m: self._completion(t, m, prompt_len, group_size)[:1],
                               tokens, attention_mask, group_size)[0]

    def completion_logits_and_hidden(self, tokens: Tensor, attention_mask: Tensor | None,
                                     prompt_len: int,
                                     group_size: int = 1) -> tuple[Tensor, Tensor]:
        """``completion_logits`` and, from the same pass, the final hidden states [B, N,
        hidden] that the lm head read to make them."""
        logits, hidden = self._by_chunks(
            lambda t, m: self._completion(t, m, prompt_len, group_size),
            tokens, attention_mask, group_size)
        return logits, hidden

    def _completion(self, tokens: Tensor, attention_mask: Tensor | None, prompt_len: int,
                    group_size: int) -> tuple[Tensor, Tensor]:
        n = tokens.shape[1] - prompt_len
        if group_size > 1 and n > 1 and not (self.checkpointing and self.training):
            return self._shared_prompt(tokens, attention_mask, prompt_len, group_size)
        mask = None if attention_mask is None else attention_mask[:, :-1]
        with self._head_inputs() as read:
            logits = self._output(tokens[:, :-1], mask, None, keep=n).logits
        return logits, read[0]

    def _shared_prompt(self, tokens: Tensor, attention_mask: Tensor | None, prompt_len: int,
                       group_size: int) -> tuple[Tensor, Tensor]:
        cache = self.new_cache(0, 0)
        prompt_mask = None if attention_mask is None else attention_mask[::group_size,
                                                                         :prompt_len]
        rest_mask = None if attention_mask is None else attention_mask[:, :-1]
        with self._head_inputs() as read:
            last = self._output(tokens[::group_size, :prompt_len], prompt_mask, cache,
                                keep=1).logits
            rest = self._output(tokens[:, prompt_len:-1], rest_mask,
                                cache.repeat_interleave(group_size, tokens.shape[1]),
                                keep=0).logits
        last_hidden, rest_hidden = read
        return (torch.cat([last.repeat_interleave(group_size, dim=0), rest], dim=1),
                torch.cat([last_hidden.repeat_interleave(group_size, dim=0), rest_hidden],
                          dim=1))

    @contextmanager
    def _head_inputs(self) -> Iterator[list[Tensor]]:
        """The lm head's input of each forward inside the block, in order: the final hidden
        states of the positions whose logits were kept (after the final norm), read from
        the pass that made the logits rather than from a second one."""
        read: list[Tensor] = []
        handle = self.model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: read.append(args[0]))
        try:
            yield read
        finally:
            handle.remove()

    def _chunked(self, tokens: Tensor) -> bool:
        # with gradient, chunks would keep every chunk's activations anyway
        return (self.chunk_rows is not None and not torch.is_grad_enabled()
                and tokens.shape[0] > self.chunk_rows)

    def _by_chunks(self, fn: Callable[[Tensor, Tensor | None], tuple[Tensor, ...]],
                   tokens: Tensor, attention_mask: Tensor | None,
                   group_size: int) -> tuple[Tensor, ...]:
        """``fn(tokens, mask)``, without gradient over chunks of whole prompt groups of at
        most ``chunk_rows`` rows where a group fits, each output concatenated."""
        if not self._chunked(tokens):
            return fn(tokens, attention_mask)
        # each chunk goes to the unchunked body: a chunk of one whole group can exceed
        # chunk_rows, and splitting it again would never end
        return in_row_chunks(fn, tokens, attention_mask,
                             max(self.chunk_rows // group_size, 1) * group_size)

    def init_weights(self) -> None:
        """Fresh initial weights from torch's global generator (the reference recipes')."""
        # transformers skips whatever it has marked initialised (loaded or drawn before)
        model = self.model
        for item in itertools.chain(model.modules(), model.parameters(), model.buffers()):
            item._is_hf_initialized = False
        model.init_weights()

    def enable_checkpointing(self) -> None:
        """Gradient (activation) checkpointing of the decoder layers; non-reentrant, so that
        frozen embeddings under LoRA need no input gradients."""
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True


class AdapterDisabled(nn.Module):
    """The reference of a LoRA policy: the policy's own calls with its adapter disabled,
    without gradient and in eval mode; no second copy of the base model (TRL's
    ``with model.disable_adapter():``).

    The policy is held but not registered: the pair's ``reference.eval()`` then leaves the
    policy's mode alone, and the policy's parameters are neither counted nor frozen through
    the reference. A zero-size frozen parameter moves with the module, so that
    ``next(reference.parameters()).device`` (the tasks' idiom) names its device."""

    def __init__(self, policy: HFCausalLM) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)
        self.vocab_size = policy.vocab_size
        self.hidden_size = policy.hidden_size
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.model.disable_adapter():
                yield
        finally:
            policy.train(was_training)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None,
                cache: HFCache | None = None, *, last_only: bool = False) -> Tensor:
        with self._base_model():
            return self.policy(tokens, attention_mask, cache, last_only=last_only)

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        return self.policy.new_cache(batch_size, max_len)

    def completion_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int, group_size: int = 1) -> Tensor:
        with self._base_model():
            return self.policy.completion_logits(tokens, attention_mask, prompt_len, group_size)

    def completion_logits_and_hidden(self, tokens: Tensor, attention_mask: Tensor | None,
                                     prompt_len: int,
                                     group_size: int = 1) -> tuple[Tensor, Tensor]:
        with self._base_model():
            return self.policy.completion_logits_and_hidden(tokens, attention_mask, prompt_len,
                                                            group_size)


def save_adapter(policy: HFCausalLM, directory: str | Path,
                 state: dict[str, Tensor] | None = None) -> None:
    """Write a LoRA policy's adapter (only) into ``directory``, for
    ``PeftModel.from_pretrained(base_model, directory)``; from ``state``, the peft model's
    full state dict, where the policy's own holds shards (None: the policy's)."""
    if not policy.is_lora:
        raise ValueError("save_adapter needs a LoRA policy (model.lora is null)")
    policy.model.save_pretrained(str(directory), state_dict=state)
