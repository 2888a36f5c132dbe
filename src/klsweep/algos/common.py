"""Pieces that several algorithms share: the clipped ratio surrogate and loss aggregation."""

from __future__ import annotations

import torch
from torch import Tensor

from klsweep.kl import masked_mean


def aggregate(values: Tensor, mask: Tensor, loss_agg: str) -> Tensor:
    """Reduce per-token values [B, N] to a scalar. ``token``: mean over every completion token
    of the batch (DAPO, Dr. GRPO), so long sequences weigh more; ``sequence``: mean over each
    sequence's tokens, then over sequences (the GRPO paper)."""
    if loss_agg == "token":
        return masked_mean(values, mask)
    if loss_agg == "sequence":
        return masked_mean(values, mask, dim=1).mean()
    raise ValueError(f"unknown loss aggregation {loss_agg!r} (allowed: token, sequence)")


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                      clip_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective per token, as a loss: ``-min(ρ·A, clip(ρ, 1±ε)·A)`` with
    ``ρ = exp(logp - old_logp)``. ``advantages`` is [B, N] or [B] (one per sequence).
    Returns (loss [B, N], ratio [B, N], clipped [B, N] as bool)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def sequence_kl_coefficient(placement: str, beta: float, mean_length: float) -> float:
    """The coefficient on sequence-level KL that β applies, for comparing algorithms and
    for the exact task's optimum: in the reward it is β itself (β·Σ_t k_t); in a
    per-token-mean loss it is β/L̄ with L̄ the mean completion length; with no penalty, 0."""
    if placement == "reward":
        return beta
    if placement == "none":
        return 0.0
    return beta / max(mean_length, 1.0)
