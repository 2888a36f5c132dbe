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


def sequence_kl_coefficient(placement: str, beta: float, advantage_scale: float = 1.0) -> float:
    """The coefficient on sequence-level KL, in units of the task reward, that β applies (for
    comparing algorithms, and the exact task's optimum). In the reward it is β: β·Σ_t k_t is
    shaped into the return and any advantage scaling divides reward and KL alike. In the loss
    it is β·s, with s what the advantages were divided by (group or batch std, whitening std;
    1 unscaled): the policy term is a per-token mean of A·∇log π, i.e. ∇E[r]/(s·L) per
    sequence, and the KL term a per-token mean, β·∇KL_seq/L, so L cancels and s stays.
    With no penalty, 0."""
    if placement == "reward":
        return beta
    if placement == "none":
        return 0.0
    return beta * advantage_scale
