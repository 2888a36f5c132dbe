"""The sampling engine's log-probs against the trainer's: how far apart they are, and the
truncated importance weights that correct the policy gradient for it (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"; verl's and TRL's TIS).

An engine computes the log-probs of the tokens it samples with its own kernels (and on a GPU
often another precision), so its samples come from a policy π_engine slightly off π_train."""

from __future__ import annotations

import torch
from torch import Tensor

from klsweep.kl import kl_per_token, masked_mean


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
