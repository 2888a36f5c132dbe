"""Prompts and sampled completions, batched sampling with a KV cache, and the per-token
log-probabilities of sampled tokens. Works with any model of the interface in
``models/base.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from klsweep.kl.estimators import by_row_chunks
from klsweep.models.base import CausalLM


@dataclass
class Prompts:
    """A batch of prompts: ``tokens`` [n, P], left-padded where ``mask`` [n, P] is False,
    and ``index`` [n], which of the task's prompts each row is (None where the task needs
    no per-prompt data to score a completion)."""

    tokens: Tensor
    mask: Tensor
    index: Tensor | None = None

    @classmethod
    def unpadded(cls, tokens: Tensor) -> Prompts:
        return cls(tokens, torch.ones_like(tokens, dtype=torch.bool))

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())

    def to(self, device: torch.device) -> Prompts:
        return Prompts(self.tokens.to(device), self.mask.to(device),
                       None if self.index is None else self.index.to(device))

    def __getitem__(self, rows: slice) -> Prompts:
        return Prompts(self.tokens[rows], self.mask[rows],
                       None if self.index is None else self.index[rows])

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class Rollout:
    """Sampled completions. ``tokens`` [B, P+N] holds prompt and completion; ``prompt_mask``
    [B, P] is False on the prompts' left padding; ``mask`` [B, N] marks the completion tokens
    up to and including EOS; ``old_logp`` [B, N] are their log-probabilities under the
    sampling policy (temperature applied). Rows come in consecutive groups of
    ``group_size`` that share one prompt; ``prompt_index`` [B] says which task prompt.
    ``engine_logp`` [B, N]: the sampling engine's own log-probs where the engine is not the
    trainer's model (vLLM, or any engine sampling ahead at ``rollout.lag`` > 0); the
    trainer's then replace ``old_logp`` when it scores them. ``version``: the step whose
    weights sampled it, where an engine samples ahead (None: the trainer's current ones)."""

    tokens: Tensor
    prompt_mask: Tensor
    mask: Tensor
    old_logp: Tensor
    group_size: int = 1
    prompt_index: Tensor | None = None
    engine_logp: Tensor | None = None
    version: int | None = None

    @property
    def prompt_len(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def completions(self) -> Tensor:
        return self.tokens[:, self.prompt_len:]

    @property
    def prompts(self) -> Tensor:
        return self.tokens[:, :self.prompt_len]

    @property
    def attention_mask(self) -> Tensor | None:
        """[B, P+N] for the model passes, or None when no prompt is padded. Completion
        tokens after EOS stay visible: causal attention keeps them out of every earlier
        position, and the loss masks them."""
        if bool(self.prompt_mask.all()):
            return None
        return torch.cat([self.prompt_mask, torch.ones_like(self.mask)], dim=1)

    def rows(self, index: Tensor, group_size: int = 1) -> Rollout:
        """The rows ``index``; ``group_size`` says how the selected rows still share
        prompts (1: no sharing assumed)."""
        return self._map(lambda t: t[index], group_size)

    def to(self, device: torch.device) -> Rollout:
        return self._map(lambda t: t.to(device), self.group_size)

    def _map(self, fn: Callable[[Tensor], Tensor], group_size: int) -> Rollout:
        """The rollout with ``fn`` applied to each of its tensors."""
        return Rollout(tokens=fn(self.tokens), prompt_mask=fn(self.prompt_mask),
                       mask=fn(self.mask), old_logp=fn(self.old_logp), group_size=group_size,
                       prompt_index=None if self.prompt_index is None
                       else fn(self.prompt_index),
                       engine_logp=None if self.engine_logp is None else fn(self.engine_logp),
                       version=self.version)

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """Rollouts of one prompt width stacked by rows."""
        index = [p.prompt_index for p in parts]
        engine = [p.engine_logp for p in parts]
        return Rollout(tokens=torch.cat([p.tokens for p in parts]),
                       prompt_mask=torch.cat([p.prompt_mask for p in parts]),
                       mask=torch.cat([p.mask for p in parts]),
                       old_logp=torch.cat([p.old_logp for p in parts]),
                       group_size=parts[0].group_size,
                       prompt_index=None if any(i is None for i in index) else torch.cat(index),
                       engine_logp=None if any(e is None for e in engine) else torch.cat(engine),
                       version=parts[0].version)


# Decoding in chunks draws every step's random numbers first: max_new_tokens × vocab of them a
# row. At a small vocabulary that is a fraction of the row's KV cache that chunks save (1/24 at
# the benchmark's shape); at a large one it is more than the cache, and one batch is decoded.
_CHUNKED_NOISE_PER_ROW = 1 << 16


@torch.no_grad()
def generate(model: CausalLM, prompts: Prompts, *, n_per_prompt: int, max_new_tokens: int,
             eos_id: int, temperature: float = 1.0, max_rows: int | None = None) -> Rollout:
    """Sample ``n_per_prompt`` completions of each prompt (rows grouped by prompt).

    The prompts are prefilled once and their cache shared by their group; each decoding step
    is one batched forward of one token. Finished rows keep emitting EOS (masked out), and
    sampling stops when every row is finished. With ``max_rows``, a larger batch of unpadded
    prompts is decoded that many rows at a time with the same tokens (``_generate_in_chunks``).
    """
    if (max_rows is not None and len(prompts) * n_per_prompt > max_rows and not prompts.padded
            and max_new_tokens * model.vocab_size <= _CHUNKED_NOISE_PER_ROW):
        return _generate_in_chunks(model, prompts, n_per_prompt=n_per_prompt,
                                   max_new_tokens=max_new_tokens, eos_id=eos_id,
                                   temperature=temperature, max_rows=max_rows)
    return _generate(model, prompts, n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens,
                     eos_id=eos_id, temperature=temperature)


def _generate(model: CausalLM, prompts: Prompts, *, n_per_prompt: int, max_new_tokens: int,
              eos_id: int, temperature: float, noise: list[Tensor] | None = None) -> Rollout:
    """``generate`` in one batch; ``noise``: each step's random numbers, [B, vocab] ~ Exp(1),
    drawn by the caller (None: drawn here, by torch.multinomial)."""
    n_prompts, prompt_len = prompts.tokens.shape
    batch = n_prompts * n_per_prompt
    padded = prompts.padded
    cache = model.new_cache(n_prompts, prompt_len)
    logits = model(prompts.tokens, prompts.mask if padded else None, cache, last_only=True)[:, -1]
    cache = cache.repeat_interleave(n_per_prompt, prompt_len + max_new_tokens)
    logits = logits.repeat_interleave(n_per_prompt, dim=0)
    prompt_mask = prompts.mask.repeat_interleave(n_per_prompt, dim=0)

    device = prompts.tokens.device
    new_tokens = torch.full((batch, max_new_tokens), eos_id, dtype=torch.long, device=device)
    old_logp = torch.zeros(batch, max_new_tokens, device=device)
    mask = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    attention = (torch.cat([prompt_mask, torch.ones_like(mask)], dim=1) if padded else None)
    for t in range(max_new_tokens):
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        token = (torch.multinomial(logp_all.exp(), 1).squeeze(1) if noise is None
                 else exponential_race(logp_all.exp(), noise[t]))
        token = torch.where(alive, token, eos_id)
        new_tokens[:, t] = token
        old_logp[:, t] = logp_all.gather(1, token[:, None]).squeeze(1)
        mask[:, t] = alive
        alive = alive & (token != eos_id)
        if t + 1 == max_new_tokens or not bool(alive.any()):
            break
        step_mask = None if attention is None else attention[:, :prompt_len + t + 1]
        logits = model(token[:, None], step_mask, cache)[:, -1]
    old_logp = old_logp * mask
    tokens = torch.cat([prompts.tokens.repeat_interleave(n_per_prompt, dim=0), new_tokens], dim=1)
    index = (None if prompts.index is None
             else prompts.index.repeat_interleave(n_per_prompt, dim=0))
    return Rollout(tokens=tokens, prompt_mask=prompt_mask, mask=mask, old_logp=old_logp,
                   group_size=n_per_prompt, prompt_index=index)


def exponential_race(probs: Tensor, noise: Tensor) -> Tensor:
    """One token per row of ``probs`` [B, V]: argmax of probs / q for q ~ Exp(1), the draw
    torch.multinomial(probs, 1) makes (it fills q from the generator, then takes this argmax),
    here with the caller's q: the same numbers give the same tokens."""
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    return torch.argmax(probs / noise, dim=-1)


def _generate_in_chunks(model: CausalLM, prompts: Prompts, *, n_per_prompt: int,
                        max_new_tokens: int, eos_id: int, temperature: float,
                        max_rows: int) -> Rollout:
    """``generate`` over whole prompts, ``max_rows`` rows at a time (the KV cache of that many
    rows, not of the batch), each row drawing the random numbers it would have drawn in one
    batch: every step's are drawn first, for the whole batch in the order one batch draws
    them, and the generator is left where one batch leaves it. Chunked or not, the tokens
    are the same (a row's logits do not depend on the rows beside it: tests/test_rollout.py)."""
    device, batch = prompts.tokens.device, len(prompts) * n_per_prompt
    state = _rng_state(device)
    noise = [torch.empty(batch, model.vocab_size, device=device).exponential_(1)
             for _ in range(max_new_tokens)]
    per_chunk = max(1, max_rows // n_per_prompt)
    parts = []
    for start in range(0, len(prompts), per_chunk):
        rows = slice(start * n_per_prompt, (start + per_chunk) * n_per_prompt)
        parts.append(_generate(model, prompts[start:start + per_chunk],
                               n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens,
                               eos_id=eos_id, temperature=temperature,
                               noise=[q[rows] for q in noise]))
    # one batch draws until its last row has ended: as many steps as its longest completion
    drawn = max(int(part.mask.sum(1).max()) for part in parts)
    _set_rng_state(device, state)
    for _ in range(drawn):
        torch.empty(batch, model.vocab_size, device=device).exponential_(1)
    return Rollout.cat(parts)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def completion_logits(model: CausalLM, rollout: Rollout, temperature: float = 1.0) -> Tensor:
    """Logits [B, N, vocab] that predict each completion token of ``rollout``, in float32 and
    divided by the sampling temperature, so that they describe the distribution the tokens
    were drawn from."""
    return tempered(model.completion_logits(rollout.tokens, rollout.attention_mask,
                                            rollout.prompt_len, rollout.group_size), temperature)


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """A model's raw logits in float32, divided by the sampling temperature."""
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(logits: Tensor, tokens: Tensor, chunk_rows: int | None = None) -> Tensor:
    """log π(token) [B, N] from logits [B, N, vocab]. The log-softmax is taken ``chunk_rows``
    rows of B at a time (None: as many as fit in ``VOCAB_CHUNK_ELEMENTS``), so that a
    full-vocabulary temporary never exists for every position at once (the memory peak at a
    150k vocabulary; TRL's selective_log_softmax has the same aim). Each row's numbers are
    those of one log-softmax over the whole tensor."""
    def picked(rows: Tensor, index: Tensor) -> Tensor:
        return torch.log_softmax(rows, dim=-1).gather(-1, index[..., None]).squeeze(-1)

    return by_row_chunks(picked, logits, tokens, rows=chunk_rows)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy [B, N] of the next-token distribution at each position, a chunk of rows at a
    time (as ``token_logprobs``)."""
    def entropy(rows: Tensor) -> Tensor:
        logp_all = torch.log_softmax(rows, dim=-1)
        return -(logp_all.exp() * logp_all).sum(-1)

    return by_row_chunks(entropy, logits)
