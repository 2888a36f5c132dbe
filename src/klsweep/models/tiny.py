"""A small GPT (nanoGPT's shape) with a key/value cache for fast sampling: ``model=tiny``.

It implements the model interface of ``models/base.py``; prompts may be left-padded (an
attention mask), though the tiny tasks' prompts all have one length."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from klsweep.models.base import in_row_chunks, padded_positions
from klsweep.models.reference import pretrained_reference
from klsweep.schema import ConfigError, spec


@dataclass
class TinyConfig:
    """``model=tiny`` (defaults: conf/model/tiny.yaml). The vocabulary and the context
    length come from the task."""

    kind: str = spec(kind="choice", choices=("tiny",), help="the model kind")
    n_layer: int = spec(kind="integer", ge=1, help="transformer blocks")
    n_head: int = spec(kind="integer", ge=1, help="attention heads")
    n_embd: int = spec(kind="integer", ge=1, help="width (a multiple of n_head)")
    dropout: float = spec(kind="number", ge=0, lt=1, help="dropout in attention")
    lr: float = spec(3e-4, kind="number", gt=0, help="optim.lr's default for this model")

    def default_lr(self) -> float:
        """The learning rate optim.lr=null stands for."""
        return self.lr

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        if cfg.model.n_embd % cfg.model.n_head:
            raise ConfigError(f"model.n_embd must be a multiple of model.n_head "
                              f"(got {cfg.model.n_embd} and {cfg.model.n_head})")


class KVCache:
    """Preallocated keys and values of every layer, [B, H, T_max, D] each; ``length`` tokens
    are filled. Writing in place avoids a torch.cat per decoded token (sampling, no grad)."""

    def __init__(self, config: TinyConfig, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(config.n_layer)]
        self.length = 0

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this layer's new keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def repeat_interleave(self, repeats: int, max_len: int) -> KVCache:
        """The cache of each sequence copied ``repeats`` times (a prompt's prefill shared by
        its group of completions), with room for ``max_len`` tokens."""
        new = object.__new__(KVCache)
        new.keys, new.values = [], []
        for mine, theirs in ((self.keys, new.keys), (self.values, new.values)):
            for layer in mine:
                B, H, _, D = layer.shape
                copied = layer.new_empty(B * repeats, H, max_len, D)
                copied[:, :, :self.length] = layer[:, :, :self.length].repeat_interleave(
                    repeats, dim=0)
                theirs.append(copied)
        new.length = self.length
        return new


class SharedPrefix:
    """Keys and values of prompts, each shared by ``repeats`` consecutive continuations, for
    a forward pass with gradient: the prompt is computed once per group instead of once per
    completion, and its gradient sums over the group. Filled by one pass over the prompts
    (``record``), then read by one pass over the continuations (``extend``)."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.length = 0

    def record(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.keys.append(k)
        self.values.append(v)

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        prefix_k = self.keys[layer].repeat_interleave(self.repeats, dim=0)
        prefix_v = self.values[layer].repeat_interleave(self.repeats, dim=0)
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cache: KVCache | SharedPrefix | None = None,
                layer: int = 0, record: bool = False, mask: Tensor | None = None) -> Tensor:
        """``mask`` [B, 1, T, S] (True: attend) is given only for padded batches; without
        it attention is plain causal."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if cache is None or record:
            if record:
                cache.record(layer, k, v)
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            start = cache.length
            k, v = cache.extend(layer, k, v)
            # Queries at positions start..start+T-1 see every earlier key: SDPA's is_causal
            # aligns to the top left, so a continuation of a prefix needs an explicit mask.
            if mask is None and T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            # dropout too: a shared prompt's completions train with it as plain rows do
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    is_decoder_layer = True  # FSDP wraps each block (klsweep.trainer)

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | SharedPrefix | None = None, layer: int = 0,
                record: bool = False, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, record, mask)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, a tied output head."""

    def __init__(self, config: TinyConfig, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.hidden_size = config.n_embd
        self.checkpointing = False  # enable_checkpointing
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Fresh initial weights from torch's global generator."""
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: Tensor, cache: KVCache | SharedPrefix | None = None,
                      record: bool = False, attention_mask: Tensor | None = None) -> Tensor:
        """Final-layer hidden states [B, T, C] of tokens ``idx`` [B, T]. With a cache, ``idx``
        continues the cached sequences and the cache grows by T; with ``record``, ``idx`` is
        a prefix whose keys and values the cache keeps. ``attention_mask`` [B, S] covers the
        cached and new positions (S = start + T); None: no padding."""
        T = idx.shape[1]
        start = 0 if cache is None or record else cache.length
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.block_size}")
        mask = None
        if attention_mask is None:
            pos = torch.arange(start, start + T, device=idx.device)
        else:
            pos = padded_positions(attention_mask, T)
            mask = _padded_causal_mask(attention_mask, T)
        x = self.wte(idx) + self.wpe(pos)
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, None, layer, False, mask, use_reentrant=False)
            else:
                x = block(x, cache, layer, record, mask)
        if cache is not None:
            cache.length = start + T
        return self.ln_f(x)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None,
                cache: KVCache | SharedPrefix | None = None, record: bool = False, *,
                last_only: bool = False) -> Tensor:
        """Logits [B, T, vocab] of the next token at every position of ``idx``; with
        ``last_only``, [B, 1, vocab] of the last, sliced from all of them: at this model's
        vocabulary they cost nothing, and the head's product keeps its shape (and numbers)."""
        logits = self.lm_head(self.hidden_states(idx, cache, record, attention_mask))
        return logits[:, -1:] if last_only else logits

    def enable_checkpointing(self) -> None:
        """Activation checkpointing: each block's activations are recomputed in backward
        instead of kept. A pass with gradient then runs without a shared prompt, whose
        blocks read a prefix that the pass itself advances (a recomputed block would read
        it advanced), as transformers refuses a cache under checkpointing."""
        self.checkpointing = True

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        weight = self.wte.weight
        return KVCache(self.config, batch_size, max_len, weight.device, weight.dtype)

    def completion_logits(self, tokens: Tensor, attention_mask: Tensor | None,
                          prompt_len: int, group_size: int = 1) -> Tensor:
        """Logits [B, N, vocab] predicting ``tokens[:, prompt_len:]``. With ``group_size`` >
        1 each shared prompt is computed once for its group (a third of the work at 8
        prompt tokens), and its gradient sums over the group. Without gradient, a large
        batch runs in equal chunks of rows (``no_grad_chunk_rows``)."""
        return self._by_chunks(lambda t, m: self._completion(t, m, prompt_len, group_size)[:1],
                               tokens, attention_mask, group_size)[0]

    def completion_logits_and_hidden(self, tokens: Tensor, attention_mask: Tensor | None,
                                     prompt_len: int,
                                     group_size: int = 1) -> tuple[Tensor, Tensor]:
        """``completion_logits`` and, from the same pass, the final hidden states [B, N, C]
        that the head turned into them."""
        logits, hidden = self._by_chunks(
            lambda t, m: self._completion(t, m, prompt_len, group_size),
            tokens, attention_mask, group_size)
        return logits, hidden

    def _by_chunks(self, fn: Callable[[Tensor, Tensor | None], tuple[Tensor, ...]],
                   tokens: Tensor, attention_mask: Tensor | None,
                   group_size: int) -> tuple[Tensor, ...]:
        if torch.is_grad_enabled() or tokens.shape[0] <= NO_GRAD_CHUNK:
            return fn(tokens, attention_mask)
        return in_row_chunks(fn, tokens, attention_mask,
                             no_grad_chunk_rows(tokens.shape[0], group_size))

    def _completion(self, tokens: Tensor, attention_mask: Tensor | None, prompt_len: int,
                    group_size: int) -> tuple[Tensor, Tensor]:
        """(logits, hidden states) at the positions that predict the completion tokens. The
        head runs on the states of every position and is sliced after, as ``forward`` does:
        a product of another shape could round differently."""
        if group_size > 1 and not (self.checkpointing and torch.is_grad_enabled()):
            prefix = SharedPrefix(group_size)
            prompt_mask = None if attention_mask is None else attention_mask[::group_size,
                                                                             :prompt_len]
            # in this order: the tied embedding's gradient sums its uses in the reverse order
            # of the graph, and another order rounds differently
            prompt_hidden = self.hidden_states(tokens[::group_size, :prompt_len], prefix,
                                               record=True, attention_mask=prompt_mask)
            last_logits = self.lm_head(prompt_hidden)[:, -1:]
            rest_mask = None if attention_mask is None else attention_mask[:, :-1]
            rest_hidden = self.hidden_states(tokens[:, prompt_len:-1], prefix,
                                             attention_mask=rest_mask)
            rest_logits = self.lm_head(rest_hidden)
            return (torch.cat([last_logits.repeat_interleave(group_size, 0), rest_logits], 1),
                    torch.cat([prompt_hidden[:, -1:].repeat_interleave(group_size, 0),
                               rest_hidden], 1))
        mask = None if attention_mask is None else attention_mask[:, :-1]
        hidden = self.hidden_states(tokens[:, :-1], attention_mask=mask)
        return self.lm_head(hidden)[:, prompt_len - 1:], hidden[:, prompt_len - 1:]


# Sequences per chunk of a pass without gradient. DPO scores its data set 2048 sequences at
# a time: whole, their activations add ~300 MiB to the run's peak; in chunks, ~40 MiB.
NO_GRAD_CHUNK = 256


def no_grad_chunk_rows(batch: int, group_size: int) -> int:
    """Rows per chunk: the batch in equal chunks of whole groups, about ``NO_GRAD_CHUNK``
    rows each. Equal chunks keep every matrix product hundreds of rows tall, where a row's
    result does not depend on how many rows the product has (MKL;
    tests/test_tiny_chunks.py checks it): chunked or not, the numbers are the same."""
    n_chunks = -(-batch // NO_GRAD_CHUNK)
    return -(-(batch // group_size) // n_chunks) * group_size


def _padded_causal_mask(attention_mask: Tensor, T: int) -> Tensor:
    """[B, 1, T, S] attention of the last T of S positions: causal, and never to a padding
    key. A padding query sees only itself, so that no row of the softmax is empty."""
    S, device = attention_mask.shape[1], attention_mask.device
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    itself = torch.zeros(T, S, dtype=torch.bool, device=device)
    itself[:, S - T:] = torch.eye(T, dtype=torch.bool, device=device)
    return causal & (attention_mask[:, None, None, :] | itself)


def build_tiny(config: TinyConfig, task: Any) -> tuple[TinyGPT, TinyGPT]:
    """``model=tiny``: the reference is trained by the task's recipe (and cached); the
    policy starts as its copy."""
    recipe = task.reference_recipe()
    if recipe is None:
        raise ValueError(f"model=tiny needs a task that trains its reference "
                         f"(task={task.name} has none)")
    block_size = task.prompt_len + task.max_new_tokens
    model_key = {"vocab_size": task.vocab_size, "block_size": block_size} | {
        k: v for k, v in asdict(config).items() if k not in ("kind", "lr")}
    reference = pretrained_reference(TinyGPT(config, task.vocab_size, block_size), model_key,
                                     recipe)
    policy = copy.deepcopy(reference).train().requires_grad_(True)
    return policy, reference.requires_grad_(False)


def untrained_tiny(config: TinyConfig, vocab_size: int,
                   block_size: int) -> tuple[TinyGPT, TinyGPT]:
    """A freshly initialised policy and an identical frozen reference, with no reference
    training (the benchmark's: its speed does not depend on the weights)."""
    policy = TinyGPT(config, vocab_size, block_size)
    reference = TinyGPT(config, vocab_size, block_size)
    reference.load_state_dict(policy.state_dict())
    return policy, reference.requires_grad_(False)
