"""Batched sampling with a KV cache, and the per-token log-probabilities of sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from klsweep.models.tiny import SharedPrefix, TinyGPT


@dataclass
class Rollout:
    """Sampled completions. ``tokens`` [B, P+N] holds prompt and completion; ``mask`` [B, N]
    marks the completion tokens up to and including EOS; ``old_logp`` [B, N] are their
    log-probabilities under the sampling policy (temperature applied). Rows come in
    consecutive groups of ``group_size`` that share one prompt."""

    tokens: Tensor
    mask: Tensor
    old_logp: Tensor
    prompt_len: int
    group_size: int = 1

    @property
    def completions(self) -> Tensor:
        return self.tokens[:, self.prompt_len:]

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())


@torch.no_grad()
def generate(model: TinyGPT, prompts: Tensor, *, n_per_prompt: int, max_new_tokens: int,
             eos_id: int, temperature: float = 1.0) -> Rollout:
    """Sample ``n_per_prompt`` completions of each prompt [n, P] (rows grouped by prompt).

    The prompts are prefilled once and their cache shared by their group; each decoding step
    is one batched forward of one token. Finished rows keep emitting EOS (masked out), and
    sampling stops when every row is finished.
    """
    n_prompts, prompt_len = prompts.shape
    batch = n_prompts * n_per_prompt
    cache = model.new_cache(n_prompts, prompt_len + max_new_tokens)
    logits = model(prompts, cache)[:, -1]
    cache = cache.repeat_interleave(n_per_prompt)
    logits = logits.repeat_interleave(n_per_prompt, dim=0)

    device = prompts.device
    new_tokens = torch.full((batch, max_new_tokens), eos_id, dtype=torch.long, device=device)
    old_logp = torch.zeros(batch, max_new_tokens, device=device)
    mask = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(logp_all.exp(), 1).squeeze(1)
        token = torch.where(alive, token, eos_id)
        new_tokens[:, t] = token
        old_logp[:, t] = logp_all.gather(1, token[:, None]).squeeze(1)
        mask[:, t] = alive
        alive = alive & (token != eos_id)
        if t + 1 == max_new_tokens or not bool(alive.any()):
            break
        logits = model(token[:, None], cache)[:, -1]
    old_logp = old_logp * mask
    tokens = torch.cat([prompts.repeat_interleave(n_per_prompt, dim=0), new_tokens], dim=1)
    return Rollout(tokens=tokens, mask=mask, old_logp=old_logp, prompt_len=prompt_len,
                   group_size=n_per_prompt)


def completion_logits(model: TinyGPT, tokens: Tensor, prompt_len: int,
                      temperature: float = 1.0, group_size: int = 1) -> Tensor:
    """Logits [B, N, vocab] that predict each completion token of ``tokens`` [B, P+N],
    divided by the sampling temperature so that they describe the distribution the tokens
    were drawn from. With ``group_size`` > 1, rows come in groups that share a prompt, and
    each prompt is computed once for its group (a third of the work at 8 prompt tokens)."""
    if group_size > 1:
        prefix = SharedPrefix(group_size)
        prompts = tokens[::group_size, :prompt_len]
        last_prompt = model(prompts, prefix, record=True)[:, -1:]
        rest = model(tokens[:, prompt_len:-1], prefix)
        logits = torch.cat([last_prompt.repeat_interleave(group_size, dim=0), rest], dim=1)
    else:
        logits = model(tokens[:, :-1])[:, prompt_len - 1:]
    return logits.float() / temperature if temperature != 1.0 else logits.float()


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π(token) [B, N] from logits [B, N, vocab]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy [B, N] of the next-token distribution at each position."""
    logp_all = torch.log_softmax(logits, dim=-1)
    return -(logp_all.exp() * logp_all).sum(-1)
