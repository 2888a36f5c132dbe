"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019): a value head, per-token
KL in the reward, GAE, whitened advantages, clipped policy and value losses, several epochs of
minibatch updates per rollout.

The step reads top to bottom: sample → reward → reference log-probs → values → per-token
rewards → GAE → epochs × minibatches of clipped updates. The math is in the pure functions.

The value head reads the policy's final hidden states, *detached*: the critic costs one small
MLP instead of a second transformer, and no value-loss gradient reaches the policy, so the
policy drifts from π_ref only through its own loss and the KL term, as in GRPO and DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from klsweep.algos.common import (
    Algorithm,
    Optimize,
    StepResult,
    clipped_surrogate,
    sample_and_score,
    sequence_kl_coefficient,
)
from klsweep.kl import ESTIMATORS, masked_mean
from klsweep.policy import CORRECTIONS, PLACEMENTS, PolicyPair
from klsweep.rollout import Prompts
from klsweep.schema import ConfigError, spec
from klsweep.tasks.base import Task


@dataclass
class PPOConfig:
    """``algo=ppo`` (defaults and their sources: conf/algo/ppo.yaml)."""

    name: str = spec(kind="choice", choices=("ppo",), help="the algorithm")
    kl_placement: str = spec(kind="choice", choices=PLACEMENTS, help="PPO's kl.placement")
    kl_estimator: str = spec(kind="choice", choices=ESTIMATORS, help="PPO's kl.estimator")
    kl_is_correction: bool | str = spec(kind="choice", choices=CORRECTIONS,
                                        help="PPO's kl.is_correction (auto: the audit's table)")
    prompts_per_step: int = spec(kind="integer", ge=1, help="prompts per rollout")
    samples_per_prompt: int = spec(kind="integer", ge=1, help="completions per prompt")
    ppo_epochs: int = spec(kind="integer", ge=1, help="passes over each rollout")
    minibatches: int = spec(kind="integer", ge=1, help="minibatches per pass")
    clip_eps: float = spec(kind="number", gt=0, help="policy clip ε")
    vf_clip: float | None = spec(kind="number", gt=0, optional=True,
                                 help="value clip range; null: no value clipping")
    vf_coef: float = spec(kind="number", ge=0, help="weight of the value loss")
    gamma: float = spec(kind="number", ge=0, le=1, help="discount γ")
    lam: float = spec(kind="number", ge=0, le=1, help="GAE λ")
    whiten_advantages: bool = spec(kind="bool", help="whiten advantages over the batch")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        rollouts = cfg.algo.prompts_per_step * cfg.algo.samples_per_prompt
        if cfg.algo.minibatches > rollouts:
            raise ConfigError(f"algo.minibatches must be <= the rollouts per step, "
                              f"prompts_per_step × samples_per_prompt = {rollouts} "
                              f"(got {cfg.algo.minibatches})")


def token_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None,
                  beta: float = 0.0) -> Tensor:
    """Per-token rewards [B, N]: ``-β·kl`` on every completion token (when ``kl`` [B, N] is
    given) plus the sequence score [B] on the last token of ``mask`` (Ziegler et al. 2019)."""
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if kl is not None:
        rewards = -beta * kl.to(scores.dtype) * mask
    last = (mask.sum(1) - 1).clamp(min=0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores * mask.any(1)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
        lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over completion tokens.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` and ``A_t = δ_t + γλ·A_{t+1}``, with V and A zero after the
    last masked token (the episode ends at EOS). Returns (advantages, returns = A + V), both
    [B, N] and zero outside ``mask``."""
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whitening_scale(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """What ``whiten`` divides by: the standard deviation over ``mask`` (unbiased, as TRL)."""
    mean = masked_mean(values, mask)
    n = mask.sum().clamp(min=2).to(values.dtype)
    return torch.sqrt(masked_mean((values - mean).square(), mask) * n / (n - 1) + eps)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``values`` scaled to unit variance over ``mask`` (unbiased variance, as TRL), and
    centred unless ``shift_mean`` is false; zero outside the mask."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) / whitening_scale(values, mask, eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float | None) -> tuple[Tensor, Tensor]:
    """PPO's value loss ``½·max((V − R)², (V_clip − R)²)`` with
    ``V_clip = V_old + clip(V − V_old, ±clip)``, averaged over ``mask``; ``clip=None``: the
    plain ``½·(V − R)²``. Returns (loss, fraction of tokens where the clipped term won)."""
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), values.new_zeros(())
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V)/Var(R)`` over ``mask``: 1 is a perfect critic, 0 predicts the mean."""
    residual = returns - values
    var_returns = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    var_residual = masked_mean((residual - masked_mean(residual, mask)).square(), mask)
    return 1.0 - var_residual / var_returns.clamp(min=1e-12)


def approx_kl(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """KL(π_old‖π_θ) on tokens sampled from π_old, by k3 on the ratio: ``E[(ρ−1) − log ρ]``
    (Schulman 2020; CleanRL's ``approx_kl``)."""
    log_ratio = logp - old_logp
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


class ValueHead(nn.Module):
    """A two-layer MLP from the policy's hidden states [..., C] to a value [...]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden).squeeze(-1)


class PPO(Algorithm):
    """The PPO step on the policy pair, with its value head."""

    Config = PPOConfig

    def setup(self, pair: PolicyPair, seed: int) -> nn.Module:
        """The value head, sized from the policy; it trains beside the policy."""
        self.value_head = ValueHead(pair.policy.hidden_size)
        return self.value_head

    def step(self, pair: PolicyPair, task: Task, prompts: Prompts, beta: float,
             optimize: Optimize) -> StepResult:
        c, placement = self.config, pair.kl.placement
        # the critic reads the features of the policy that sampled, from the pass that
        # scored the rollout; they stay fixed over this rollout's epochs, so the head trains
        # on that one forward pass of the trunk
        fresh = sample_and_score(pair, task, prompts, c.samples_per_prompt, grad=False,
                                 features=True)
        scored, scores, features = fresh.scored, fresh.rewards, fresh.scored.features
        rollout, mask, old_logp = scored.rollout, scored.mask, scored.logp
        metrics = dict(fresh.measurement.metrics)
        with torch.no_grad():
            old_values = self.value_head(features) * mask

        kl_t = (pair.reward_penalty(old_logp, scored.ref_logp, scored.logits,
                                    scored.ref_logits, mask)
                if placement == "reward" else None)
        rewards = token_rewards(scores, mask, kl_t, beta)
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        scale = 1.0
        if c.whiten_advantages:
            scale = float(whitening_scale(advantages, mask))
            advantages = whiten(advantages, mask)
        metrics["policy/advantage_scale"] = scale

        # samples of another policy (an engine's, older weights): weights on the surrogate
        # and, for AReaL's decoupled objective, the proximal policy the clip is taken against
        correction = pair.pg_correction(scored)
        metrics.update(correction.metrics)
        anchor = correction.clip_anchor(old_logp)
        kl_old_logp = scored.kl_old_logp(old_logp)
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(c.ppo_epochs):
            for index in torch.randperm(mask.shape[0]).tensor_split(c.minibatches):
                mb_mask = mask[index]
                mb_logits, logp = pair.policy_logprobs(rollout.rows(index))
                surrogate, ratio, clipped = clipped_surrogate(logp, anchor[index],
                                                              advantages[index], c.clip_eps)
                if correction.weights is not None:  # on the policy-gradient term only
                    surrogate = surrogate * correction.weights[index]
                policy_loss = masked_mean(surrogate, mb_mask)
                value_loss, value_clipfrac = clipped_value_loss(
                    self.value_head(features[index]), old_values[index], returns[index],
                    mb_mask, c.vf_clip)
                loss = policy_loss + c.vf_coef * value_loss
                kl_loss = torch.zeros(())
                if placement == "loss":
                    kl_loss = masked_mean(pair.kl_loss_term(
                        logp, scored.ref_logp[index], mb_logits, scored.ref_logits[index],
                        kl_old_logp[index], mb_mask), mb_mask)
                    loss = loss + beta * kl_loss
                stats = {"loss/policy": policy_loss, "loss/value": value_loss,
                         "loss/kl": kl_loss, "loss/total": loss,
                         "policy/clipfrac": masked_mean(clipped.float(), mb_mask),
                         "policy/ratio": masked_mean(ratio, mb_mask),
                         "policy/approx_kl": approx_kl(logp, old_logp[index], mb_mask),
                         "value/clipfrac": value_clipfrac}
                optimize(loss)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
                updates += 1
        # means over every minibatch update of this rollout (TRL logs the same)
        metrics.update({key: value / updates for key, value in totals.items()})
        metrics.update({
            "value/mean": float(masked_mean(old_values, mask)),
            "value/loss": metrics["loss/value"],
            "value/explained_variance": float(explained_variance(old_values, returns, mask)),
            "reward/shaped": float(rewards.sum(1).mean()),
        })
        # β in the reward; in the loss β times the whitening divisor of the advantages
        return StepResult(metrics, fresh.measurement.kl, fresh.measurement.n_samples,
                          sequence_kl_coefficient(placement, beta, scale))
