"""GRPO (Shao et al. 2024, DeepSeekMath): G completions per prompt, group-normalised
advantages, PPO's clipped ratio, and the KL penalty in the loss (or the reward).

The step reads top to bottom: sample groups → reward → reference log-probs → advantages →
μ clipped updates. The math is in the pure functions below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from klsweep.algos.common import (
    LOSS_AGGREGATIONS,
    Algorithm,
    Optimize,
    StepResult,
    aggregate,
    clipped_surrogate,
    sample_and_score,
    sequence_kl_coefficient,
)
from klsweep.kl import ESTIMATORS, masked_sum
from klsweep.policy import CORRECTIONS, PLACEMENTS, PolicyPair
from klsweep.rollout import Prompts
from klsweep.schema import spec
from klsweep.tasks.base import Task

SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    """``algo=grpo`` (defaults and their sources: conf/algo/grpo.yaml)."""

    name: str = spec(kind="choice", choices=("grpo",), help="the algorithm")
    kl_placement: str = spec(kind="choice", choices=PLACEMENTS, help="GRPO's kl.placement")
    kl_estimator: str = spec(kind="choice", choices=ESTIMATORS, help="GRPO's kl.estimator")
    kl_is_correction: bool | str = spec(kind="choice", choices=CORRECTIONS,
                                        help="GRPO's kl.is_correction (auto: the audit's table)")
    prompts_per_step: int = spec(kind="integer", ge=1, help="prompts per rollout")
    group_size: int = spec(kind="integer", ge=2, help="completions per prompt (G)")
    scale_rewards: str = spec(kind="choice", choices=SCALE_REWARDS,
                              help="divide centred rewards by the group's or batch's std, or not")
    clip_eps: float = spec(kind="number", gt=0, help="PPO clip ε")
    clip_eps_high: float = spec(kind="number", gt=0,
                                help="upper clip ε of the ratio (DAPO's clip-higher; default ε)")
    loss_agg: str = spec(kind="choice", choices=LOSS_AGGREGATIONS,
                         help="token: mean over the batch's tokens | sequence: per sequence first")
    updates_per_rollout: int = spec(kind="integer", ge=1, help="μ, gradient steps per rollout")


def _advantage_divisor(rewards: Tensor, group_size: int, scale: str, eps: float) -> Tensor:
    """What each group's centred rewards are divided by, [n_groups, 1]."""
    grouped = rewards.view(-1, group_size)
    if scale == "group":
        return grouped.std(dim=1, keepdim=True) + eps
    if scale == "batch":
        return (rewards.std() + eps).expand(grouped.shape[0], 1)
    if scale == "none":
        return torch.ones(grouped.shape[0], 1, dtype=rewards.dtype, device=rewards.device)
    raise ValueError(f"unknown advantage scaling {scale!r} (allowed: {', '.join(SCALE_REWARDS)})")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> Tensor:
    """Advantages [B] of rewards [B] laid out as consecutive groups of ``group_size``
    completions of one prompt: the reward minus its group's mean, divided by the group's std
    (``group``, the GRPO paper), the whole batch's std (``batch``) or nothing (``none``,
    Dr. GRPO). ``eps`` keeps groups of equal rewards at zero advantage (TRL uses 1e-4)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / _advantage_divisor(rewards, group_size, scale, eps)).reshape(-1)


def advantage_scale(rewards: Tensor, group_size: int, scale: str = "group",
                    eps: float = 1e-4) -> float:
    """The mean divisor that ``group_advantages`` applies (1 for ``none``): a KL coefficient β
    in the loss weighs the KL against the reward as β times this."""
    return float(_advantage_divisor(rewards, group_size, scale, eps).mean())


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              clip_eps: float, loss_agg: str, kl: Tensor | None = None,
              beta: float = 0.0, tis: Tensor | None = None,
              clip_eps_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss: the clipped surrogate on sequence advantages [B] broadcast over tokens
    (the ratio clipped to [1 − clip_eps, 1 + clip_eps_high], DAPO's clip-higher),
    plus ``beta`` times the per-token KL term ``kl`` [B, N] when the KL is in the loss, both
    aggregated the same way over the completion ``mask``. ``tis`` [B, N]: importance weights
    on the surrogate (rollout.correction), not on the KL term (kl.is_correction)."""
    surrogate, ratio, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps,
                                                  clip_eps_high)
    if tis is not None:
        surrogate = surrogate * tis
    policy_loss = aggregate(surrogate, mask, loss_agg)
    kl_loss = aggregate(kl, mask, loss_agg) if kl is not None else logp.new_zeros(())
    loss = policy_loss + beta * kl_loss
    stats = {"loss/policy": policy_loss.detach(), "loss/kl": kl_loss.detach(),
             "loss/total": loss.detach(),
             "policy/clipfrac": aggregate(clipped.float(), mask, "token").detach(),
             "policy/ratio": aggregate(ratio.detach(), mask, "token")}
    return loss, stats


class GRPO(Algorithm):
    """The GRPO step on the policy pair."""

    Config = GRPOConfig

    def step(self, pair: PolicyPair, task: Task, prompts: Prompts, beta: float,
             optimize: Optimize) -> StepResult:
        c, placement = self.config, pair.kl.placement
        fresh = sample_and_score(pair, task, prompts, c.group_size)
        scored, rewards = fresh.scored, fresh.rewards
        rollout, mask = scored.rollout, scored.mask
        metrics = dict(fresh.measurement.metrics)

        shaped = rewards
        if placement == "reward":
            # The sequence reward minus β·Σ_t k(l_t), detached (Ziegler et al. 2019).
            kl_t = pair.reward_penalty(scored.logp.detach(), scored.ref_logp,
                                       scored.logits.detach(), scored.ref_logits, mask)
            shaped = rewards - beta * masked_sum(kl_t, mask)
        advantages = group_advantages(shaped, c.group_size, c.scale_rewards)
        scale = advantage_scale(shaped, c.group_size, c.scale_rewards)
        metrics["policy/advantage_scale"] = scale

        logits, logp = scored.logits, scored.logp
        # samples of another policy (an engine's, older weights): weights on the surrogate
        # and, for AReaL's decoupled objective, the proximal policy the clip is taken against
        correction = pair.pg_correction(scored)
        metrics.update(correction.metrics)
        for update in range(c.updates_per_rollout):
            if update > 0:
                logits, logp = pair.policy_logprobs(rollout)
            old_logp = rollout.old_logp if c.updates_per_rollout > 1 else logp.detach()
            kl_term = (pair.kl_loss_term(logp, scored.ref_logp, logits, scored.ref_logits,
                                         scored.kl_old_logp(old_logp), mask)
                       if placement == "loss" else None)
            anchor = correction.clip_anchor(old_logp)
            loss, stats = grpo_loss(logp, anchor, advantages, mask, clip_eps=c.clip_eps,
                                    loss_agg=c.loss_agg, kl=kl_term, beta=beta,
                                    tis=correction.weights, clip_eps_high=c.clip_eps_high)
            optimize(loss)
            if update == 0:
                metrics.update({k: float(v) for k, v in stats.items()})
        # β in the reward; in the loss β times the advantages' divisor, since the surrogate
        # and the KL term are aggregated alike (see ``sequence_kl_coefficient``)
        return StepResult(metrics, fresh.measurement.kl, fresh.measurement.n_samples,
                          sequence_kl_coefficient(placement, beta, scale))
