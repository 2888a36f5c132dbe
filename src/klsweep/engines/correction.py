"""The sampling policy's log-probs against the trainer's: how far apart they are, and the
importance weights that correct the policy-gradient term for it.

An engine computes the log-probs of the tokens it samples with its own kernels (and on a GPU
often another precision), so its samples come from a policy π_engine slightly off π_train
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training";
verl's and TRL's TIS). With ``rollout.lag`` = K the engine samples with the weights of K
optimiser steps ago, and the samples are off-policy by those steps too (verl's one-step-off,
PipelineRL's fixed lag). The corrections, named as TRL names them (its
``vllm_importance_sampling_mode``), with ρ_t = π_train/π_behaviour per token (detached) and
ρ = Π_t ρ_t per sequence, and AReaL's decoupled objective (Fu et al. 2025):

* ``token_truncate``: min(ρ_t, C) on each token (today's TIS);
* ``token_mask``: ρ_t, or 0 where ρ_t > C;
* ``sequence_truncate``: min(ρ, C) on every token of the sequence;
* ``sequence_mask``: ρ, or 0 for the whole sequence where ρ > C;
* ``decoupled``: the clip is taken against the proximal policy π_prox = π_θ(t−1), recomputed
  by the trainer, and each token weighted by π_prox/π_behaviour, 0 where above C (AReaL's
  default ``token_mask``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from klsweep.kl import kl_per_token, masked_mean, masked_sum
from klsweep.rollout import Rollout, completion_logits, token_logprobs

NONE, DECOUPLED = "none", "decoupled"
MODES = (NONE, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", DECOUPLED)
AUTO = "auto"
# the cap C where a mode needs one and rollout.tis_cap is null: Yao et al. 2025's and verl's
DEFAULT_CAP = 2.0
# rollout.correction=auto at rollout.lag > 0 (the exact task: docs/research/off-policy-kl.md)
LAGGED_DEFAULT = "token_truncate"


@torch.no_grad()
def mismatch_metrics(train_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """``rollout/mismatch_k3``: the mean over completion tokens of k3 = exp(−l) − 1 + l with
    l = log π_engine − log π_train, an unbiased estimate per token of KL(π_engine‖π_train) on
    the engine's samples (DESIGN §4's k3 with the engine as the sampler);
    ``rollout/mismatch_max``: the largest |l| over those tokens."""
    log_ratio = (engine_logp - train_logp).float()
    k3 = kl_per_token(engine_logp.float(), train_logp.float(), "k3", clamp=None)
    largest = log_ratio.abs().masked_fill(~mask, 0.0).max() if bool(mask.any()) else 0.0
    return {"rollout/mismatch_k3": float(masked_mean(k3, mask)),
            "rollout/mismatch_max": float(largest)}


def tis_weights(train_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """Per-token weights [B, N] min(π_train_old / π_engine, cap), detached: multiplied into
    the policy-gradient term they make its expectation over the engine's samples that over
    π_train's, with the variance bounded by ``cap`` (token-level TIS, as verl and TRL)."""
    return torch.exp(train_logp.detach() - engine_logp).clamp(max=cap)


def correction_weights(train_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, mode: str,
                       cap: float) -> tuple[Tensor, Tensor, Tensor]:
    """The weights [B, N] (detached) that ``mode`` puts on the policy-gradient term of
    samples drawn from π_behaviour, for a target π_train (for ``decoupled`` pass π_prox as
    ``train_logp``); with the ratios they come from [B, N] (per sequence for the sequence
    modes, repeated on its tokens) and which tokens were truncated or masked [B, N]."""
    log_ratio = (train_logp.detach() - behaviour_logp).float() * mask
    if mode.startswith("sequence_"):
        log_ratio = masked_sum(log_ratio, mask)[:, None].expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    cut = (ratio > cap) & mask
    if mode in ("token_truncate", "sequence_truncate"):
        weights = ratio.clamp(max=cap)
    elif mode in ("token_mask", "sequence_mask", DECOUPLED):
        weights = ratio.masked_fill(cut, 0.0)
    else:
        raise ValueError(f"unknown correction {mode!r} (allowed: {', '.join(MODES[1:])})")
    return weights * mask, ratio, cut


@torch.no_grad()
def weight_metrics(weights: Tensor, ratio: Tensor, cut: Tensor, mask: Tensor) -> dict[str, float]:
    """``rollout/is_mean``: the mean weight over completion tokens; ``rollout/is_max``: the
    largest ratio before the cap; ``rollout/is_cut``: the share of completion tokens whose
    weight was truncated or masked (for the sequence modes, of their sequences' tokens)."""
    largest = float(ratio.masked_fill(~mask, 0.0).max()) if bool(mask.any()) else 0.0
    return {"rollout/is_mean": float(masked_mean(weights, mask)), "rollout/is_max": largest,
            "rollout/is_cut": float(masked_mean(cut.float(), mask))}


def resolve(mode: str, cap: float | None, lag: int) -> tuple[str, float | None]:
    """``rollout.correction`` and ``rollout.tis_cap`` as a run applies them: ``auto`` is
    ``token_truncate`` where a cap is set (verl's and TRL's TIS, as before the lag) and
    nothing else at lag 0, and ``LAGGED_DEFAULT`` at lag > 0; a mode that needs a cap and
    has none takes ``DEFAULT_CAP``."""
    if mode == AUTO:
        mode = LAGGED_DEFAULT if lag > 0 else ("token_truncate" if cap is not None else NONE)
    if mode != NONE and cap is None:
        cap = DEFAULT_CAP
    return mode, cap


@dataclass
class Correction:
    """What a step's policy-gradient term takes from the correction: ``weights`` [B, N] on
    each token's term (None: none), the log-probs the clip is taken against (``anchor``:
    π_prox for ``decoupled``; None: the step's own π_old), and the metrics to log."""

    weights: Tensor | None = None
    anchor: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def clip_anchor(self, old_logp: Tensor) -> Tensor:
        """The log-probs the ratio is clipped against: π_prox's, else the step's ``old_logp``."""
        return old_logp if self.anchor is None else self.anchor


class PolicyGradientCorrection:
    """``rollout.correction`` with its cap: the weights on the policy-gradient term of samples
    that another policy drew (an engine's kernels, or the weights of ``rollout.lag`` steps
    ago). For ``decoupled`` it keeps π_prox, a frozen copy of the policy one step behind."""

    def __init__(self, mode: str, cap: float | None, policy: nn.Module | None,
                 temperature: float) -> None:
        self.mode, self.cap, self.temperature = mode, cap, temperature
        self.policy = policy
        self.proximal = (copy.deepcopy(policy).requires_grad_(False)
                         if mode == DECOUPLED and policy is not None else None)

    def __call__(self, rollout: Rollout, old_logp: Tensor) -> Correction:
        """The correction of ``rollout`` (sampled where ``rollout.engine_logp`` says), whose
        tokens the trainer's π_old gives ``old_logp``; for ``decoupled``, π_prox then steps
        to the policy as it is now, before this step's update."""
        behaviour = rollout.engine_logp
        if self.mode == NONE or behaviour is None:
            return Correction()
        mask = rollout.mask
        anchor = None
        if self.mode == DECOUPLED:
            anchor = self._proximal_logprobs(rollout)
            self._step_proximal()
        weights, ratio, cut = correction_weights(
            old_logp if anchor is None else anchor, behaviour, mask, self.mode, self.cap)
        return Correction(weights, anchor, weight_metrics(weights, ratio, cut, mask))

    @torch.no_grad()
    def _proximal_logprobs(self, rollout: Rollout) -> Tensor:
        self.proximal.to(rollout.tokens.device).eval()  # where the trainer moved the policy
        logits = completion_logits(self.proximal, rollout, self.temperature)
        return token_logprobs(logits, rollout.completions) * rollout.mask

    def _trained(self) -> list[tuple[Tensor, Tensor]]:
        """(π_prox's, the policy's) parameter pairs that training changes (LoRA: the adapter)."""
        return [(mine, theirs) for mine, theirs in zip(self.proximal.parameters(),
                                                       self.policy.parameters(), strict=True)
                if theirs.requires_grad]

    @torch.no_grad()
    def _step_proximal(self) -> None:
        for mine, theirs in self._trained():
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        """π_prox's trained weights (``decoupled``): a resumed run clips against the same."""
        if self.proximal is None:
            return {}
        return {"proximal": [mine.detach().cpu().clone() for mine, _ in self._trained()]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.proximal is None:
            return
        for (mine, _), saved in zip(self._trained(), state["proximal"], strict=True):
            mine.copy_(saved)
