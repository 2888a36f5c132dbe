"""Preferences between two completions of one prompt, from their rewards: the labels a pair
gets (Bradley & Terry 1952, or the higher reward), and the Bradley–Terry loss a reward model
is fitted with. Used by DPO's offline pairs and by the proxy reward model; imports neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LABELS = ("bradley_terry", "deterministic")


def bradley_terry_labels(rewards_a: Tensor, rewards_b: Tensor,
                         generator: torch.Generator | None = None) -> Tensor:
    """Whether ``a`` is preferred [B] (bool), drawn with P(a ≻ b) = σ(r_a − r_b)."""
    p_a = torch.sigmoid(rewards_a - rewards_b)
    return torch.rand(p_a.shape, generator=generator, device=p_a.device) < p_a


def deterministic_labels(rewards_a: Tensor, rewards_b: Tensor,
                         generator: torch.Generator | None = None) -> Tensor:
    """Whether ``a`` is preferred [B]: the higher reward wins, ties by a fair coin."""
    coin = torch.rand(rewards_a.shape, generator=generator, device=rewards_a.device) < 0.5
    return torch.where(rewards_a == rewards_b, coin, rewards_a > rewards_b)


def preference_labels(rewards_a: Tensor, rewards_b: Tensor, kind: str,
                      generator: torch.Generator | None = None) -> Tensor:
    if kind == "bradley_terry":
        return bradley_terry_labels(rewards_a, rewards_b, generator)
    if kind == "deterministic":
        return deterministic_labels(rewards_a, rewards_b, generator)
    raise ValueError(f"unknown preference labels {kind!r} (allowed: {', '.join(LABELS)})")


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """−log σ(s_chosen − s_rejected), mean over pairs: the reward-model loss of Ouyang et al.
    (2022), whose minimiser in expectation over Bradley–Terry labels is the gold reward up to a
    constant per prompt."""
    return -F.logsigmoid(chosen - rejected).mean()
