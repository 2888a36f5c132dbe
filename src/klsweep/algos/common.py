"""What the algorithms share: the step's interface (``Algorithm``, ``StepResult``), the
sample-and-score prelude, the clipped ratio surrogate and loss aggregation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from klsweep.kl import masked_mean
from klsweep.policy import Measurement, PolicyPair, Scored
from klsweep.rollout import Prompts
from klsweep.tasks.base import Task

LOSS_AGGREGATIONS = ("token", "sequence")


def aggregate(values: Tensor, mask: Tensor, loss_agg: str) -> Tensor:
    """Reduce per-token values [B, N] to a scalar. ``token``: mean over every completion token
    of the batch (DAPO, Dr. GRPO), so long sequences weigh more; ``sequence``: mean over each
    sequence's tokens, then over sequences (the GRPO paper)."""
    if loss_agg == "token":
        return masked_mean(values, mask)
    if loss_agg == "sequence":
        return masked_mean(values, mask, dim=1).mean()
    raise ValueError(f"unknown loss aggregation {loss_agg!r} "
                     f"(allowed: {', '.join(LOSS_AGGREGATIONS)})")


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float,
                      clip_eps_high: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective per token, as a loss: ``-min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A)``
    with ``ρ = exp(logp - old_logp)``; ``clip_eps_high`` None: ε (DAPO's clip-higher sets it
    above ε). ``advantages`` is [B, N] or [B] (one per sequence).
    Returns (loss [B, N], ratio [B, N], clipped [B, N] as bool)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
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


@dataclass
class StepResult:
    """What one step of an algorithm gives the training loop."""

    metrics: dict[str, float]
    kl: float          # in kl.unit: what the schedule steers
    n_samples: int     # fresh samples it was measured on; 0 leaves β where it is
    beta_seq: float    # the coefficient on sequence KL this step applied


Optimize = Callable[[Tensor], None]


@dataclass
class FreshSamples:
    """Completions just sampled from the policy, scored by both models and the task."""

    scored: Scored
    rewards: Tensor
    measurement: Measurement


def sample_and_score(pair: PolicyPair, task: Task, prompts: Prompts, n_per_prompt: int, *,
                     grad: bool = True, features: bool = False) -> FreshSamples:
    """The prelude every algorithm shares: sample → reward → both models' log-probs (and
    the policy's ``features`` from the same pass, for a critic) → the step's KL and reward
    statistics."""
    rollout = pair.sample(prompts, n_per_prompt)
    rewards = task.reward(rollout)
    scored = pair.score(rollout, grad=grad, features=features)
    measurement = pair.measure(scored, rewards)
    measurement.metrics.update(task.reward_metrics(rollout, rewards))
    return FreshSamples(scored, rewards, measurement)


class Algorithm:
    """What the training loop calls. Subclasses implement ``step``; ``setup`` builds any
    trainable part of their own (PPO's value head), which trains beside the policy.
    ``Config`` is the typed dataclass of the algorithm's config node."""

    Config: type

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self, pair: PolicyPair, seed: int) -> nn.Module | None:
        return None

    def prompts_per_step(self) -> int:
        return self.config.prompts_per_step

    def step(self, pair: PolicyPair, task: Task, prompts: Prompts, beta: float,
             optimize: Optimize) -> StepResult:
        raise NotImplementedError

    def on_reference_sync(self, pair: PolicyPair) -> None:
        """The reference just moved (``kl.reference.sync_every``): refresh anything computed
        from it."""

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's own state beyond its trainable module (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
