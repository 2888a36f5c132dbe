"""A small GPT (nanoGPT's shape) with a key/value cache for fast sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TinyGPTConfig:
    vocab_size: int = 12
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class KVCache:
    """Preallocated keys and values of every layer, [B, H, T_max, D] each; ``length`` tokens
    are filled. Writing in place avoids a torch.cat per decoded token."""

    def __init__(self, config: TinyGPTConfig, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(config.n_layer)]
        self.length = 0

    def repeat_interleave(self, repeats: int) -> KVCache:
        """The cache of each sequence copied ``repeats`` times (a prompt's prefill shared by
        its group of completions)."""
        new = object.__new__(KVCache)
        new.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        new.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]
        new.length = self.length
        return new


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            start = cache.length
            cache.keys[layer][:, :, start:start + T] = k
            cache.values[layer][:, :, start:start + T] = v
            k = cache.keys[layer][:, :, :start + T]
            v = cache.values[layer][:, :, :start + T]
            # A single new query may look at every cached key; a prefill is causal within
            # itself and starts from an empty cache.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, a tied output head."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Final-layer hidden states [B, T, C] of tokens ``idx`` [B, T]; with a cache, ``idx``
        continues the cached sequence and the cache grows by T."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits [B, T, vocab] of the next token at every position of ``idx``."""
        return self.lm_head(self.hidden_states(idx, cache))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        weight = self.wte.weight
        return KVCache(self.config, batch_size, max_len, weight.device, weight.dtype)
