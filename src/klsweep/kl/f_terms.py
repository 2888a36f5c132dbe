"""What training does with an f-divergence on sampled completions: the reward penalty, the
loss term and the value estimate, per token [B, N] over a contiguous completion ``mask``.
Pure functions of a ``Divergence`` and tensors, tested alone by enumeration
(tests/test_f_terms.py): on-policy, the expected gradient of each penalty and loss term is
the gradient of the divergence, D_seq(π) = D_f(π‖π_ref) over whole completions
(``unit="sequence"``) or D_tok(π) = E_π[Σ_t D_f(π(·|s_t)‖π_ref(·|s_t))] (``unit="token"``).

The identities behind them (u = π/π_ref, a sequence's or a position's):
* ∇D_f = E_π[f′(u)·∇log π]: the score-function weight of a sample is f′(u).
* D_f = E_π[f(u)/u]: f(u)/u of a sample estimates it without bias (k1 for the KL), and so
  does f(u)/u + f′(1)·(1/u − 1), non-negative by convexity (k3 for the KL), since E_π[1/u] = 1.
* For the token unit, ∇D_tok = E_π[Σ_t ∇log π(a_t|s_t)·(f′(u_t) + Σ_{t′>t} d_{t′})], d_t
  the divergence at position t: a position's choice moves its own divergence and where the
  later positions are. The per-token reward ρ_t = f′(u_t) − E_π[f′]_t + d_t, exact over the
  vocabulary, has that expectation from any t on, and −E_π[f′]_t + d_t depends only on the
  prefix (a baseline), so it is unbiased both for PPO's return-to-go and for GRPO's
  sequence sum. (From samples alone a reward would have to look one token ahead, which
  GRPO's sum turns into a bias.) For the KL ρ_t is the log-ratio, k1.

Log-ratios are clamped to ±``clamp`` first, as the KL estimators' (the ratio of a sequence
overflows long before its log)."""

from __future__ import annotations

import torch
from torch import Tensor

from klsweep.kl.estimators import by_row_chunks

SEQUENCE, TOKEN = "sequence", "token"


def _log_ratio(logp: Tensor, ref_logp: Tensor, mask: Tensor, clamp: float | None) -> Tensor:
    """log u per token [B, N], 0 outside ``mask``."""
    log_u = torch.where(mask, logp - ref_logp, torch.zeros_like(logp))
    return log_u if clamp is None else log_u.clamp(-clamp, clamp)


def _sequence_log_ratio(logp: Tensor, ref_logp: Tensor, mask: Tensor,
                        clamp: float | None) -> Tensor:
    """log u of each sequence [B]: the masked sum of the per-token log-ratios."""
    log_u = torch.where(mask, logp - ref_logp, torch.zeros_like(logp)).sum(1)
    return log_u if clamp is None else log_u.clamp(-clamp, clamp)


def on_last_token(values: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence ``values`` [B] placed on each row's last masked token, [B, N]."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    last = (mask.sum(1) - 1).clamp(min=0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last] = values * mask.any(1)
    return out


def sum_after(values: Tensor) -> Tensor:
    """Σ_{t′>t} values[t′] at t."""
    return values.flip(1).cumsum(1).flip(1) - values


def vocab_terms(div, logits: Tensor, ref_logits: Tensor,
                clamp: float | None) -> tuple[Tensor, Tensor]:
    """(d_t, E_π[f′]_t) at every position [B, N], exact over the vocabulary, with the
    gradient of the policy's ``logits``, a chunk of rows at a time."""
    def terms(rows: Tensor, ref_rows: Tensor) -> Tensor:
        wide = torch.promote_types(rows.dtype, torch.float32)  # bf16 up, float64 kept
        logp_all = torch.log_softmax(rows.to(wide), dim=-1)
        ref_all = torch.log_softmax(ref_rows.to(wide), dim=-1)
        log_u = logp_all - ref_all
        if clamp is not None:
            log_u = log_u.clamp(-clamp, clamp)
        d = (ref_all.exp() * div.f(log_u)).sum(-1)
        mean_f_prime = (logp_all.exp() * div.f_prime(log_u)).sum(-1)
        return torch.stack([d, mean_f_prime], dim=-1)

    both = by_row_chunks(terms, logits, ref_logits)
    return both[..., 0].to(logits.dtype), both[..., 1].to(logits.dtype)


def value_per_token(div, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, unit: str,
                    estimator: str, logits: Tensor | None = None,
                    ref_logits: Tensor | None = None, clamp: float | None = None) -> Tensor:
    """The divergence's estimate per token [B, N], whose masked sum per sequence averages
    to D (``estimator``: ``k1`` f(u)/u, ``k3`` the non-negative one, ``full`` the exact
    per-position d_t, token unit only); the sequence unit's sits on the last token."""
    if unit == SEQUENCE:
        log_u = _sequence_log_ratio(logp, ref_logp, mask, clamp)
        return on_last_token(_sampled(div, log_u, estimator), mask)
    if estimator == "full":
        return vocab_terms(div, logits, ref_logits, clamp)[0] * mask
    return _sampled(div, _log_ratio(logp, ref_logp, mask, clamp), estimator) * mask


def _sampled(div, log_u: Tensor, estimator: str) -> Tensor:
    value = div.sampled_value(log_u)
    if estimator == "k3":
        value = value + div.f_prime(torch.zeros((), dtype=log_u.dtype)) * torch.expm1(-log_u)
    return value


@torch.no_grad()
def reward_penalty(div, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, unit: str,
                   estimator: str = "k1", logits: Tensor | None = None,
                   ref_logits: Tensor | None = None, clamp: float | None = None) -> Tensor:
    """The per-token penalty [B, N] that β times is taken from the reward: whose
    score-function gradient is ∇D (module docstring). Sequence unit: f′(u) of the
    sequence on its last token; token unit: ρ_t, over the vocabulary whatever the
    ``estimator`` (which picks only the logged value)."""
    if unit == SEQUENCE:
        return on_last_token(div.f_prime(_sequence_log_ratio(logp, ref_logp, mask, clamp)), mask)
    d, mean_f_prime = vocab_terms(div, logits, ref_logits, clamp)
    return (div.f_prime(_log_ratio(logp, ref_logp, mask, clamp)) - mean_f_prime + d) * mask


def loss_term(div, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, unit: str, estimator: str,
              logits: Tensor | None = None, ref_logits: Tensor | None = None,
              clamp: float | None = None) -> Tensor:
    """The per-token term [B, N] of a loss: its value is ``value_per_token``'s (what loss/kl
    logs), its gradient on-policy that of D in expectation, through log π_θ (and through the
    vocabulary's d_t with ``full``). Samples from an older policy (several updates per
    rollout) are taken as on-policy, as the KL estimators take them."""
    value = value_per_token(div, logp.detach(), ref_logp, mask, unit=unit, estimator=estimator,
                            logits=None if logits is None else logits.detach(),
                            ref_logits=ref_logits, clamp=clamp)
    score = logp - logp.detach()  # value 0, gradient ∇log π
    with torch.no_grad():
        if unit == SEQUENCE:
            weight = div.f_prime(_sequence_log_ratio(logp, ref_logp, mask, clamp))[:, None]
        elif estimator != "full":
            log_u = _log_ratio(logp, ref_logp, mask, clamp)
            weight = div.f_prime(log_u) + sum_after(div.sampled_value(log_u) * mask)
    if unit == TOKEN and estimator == "full":
        d = vocab_terms(div, logits, ref_logits, clamp)[0] * mask
        return value + (d - d.detach()) + score * sum_after(d.detach())
    return value + score * weight * mask
