"""Exact quantities of a KL-regularised objective over an enumerated set of completions.

Every function takes per-prompt numpy tables of shape [X, Y] (X prompts, Y completions each, the
same completion set for every prompt): ``logp`` and ``ref_logp`` are the sequence
log-probabilities of each completion under the policy and the reference, ``reward`` its
reward. Prompts weigh equally. Everything is float64 numpy, so that the logged figures can be
recomputed from ``exact.json`` to 1e-6, and because the root search makes hundreds of small
passes for which torch's per-operation overhead would dominate.

The objective is J(π) = E_x[E_π[r] − β·KL(π(·|x)‖π_ref(·|x))] with β the coefficient on
*sequence-level* KL. Its maximiser is π*(y|x) ∝ π_ref(y|x)·exp(r(x,y)/β) with
J* = E_x[β·log E_ref[exp(r/β)]] (Korbak et al. 2022, Rafailov et al. 2023); β → 0 gives the
reference restricted to the reward's argmax set, whose reward is the maximum and J* = max r.
The reward–KL frontier, the highest mean reward at a mean KL, is π* over all β with one β
shared by all prompts (the Lagrangian of a concave problem).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from numpy.typing import NDArray

Table = NDArray[np.float64]

# the frontier's root search in u = log τ (τ = 1/β): the bracket grows by ×10 in τ, and the
# search stops when the KL is within _KL_TOLERANCE (relative) of its target
_BRACKET_STEP = math.log(10.0)
_BRACKET_STEPS = 40
_ROOT_STEPS = 100
_KL_TOLERANCE = 1e-13


def enumerate_completions(vocab_size: int, length: int) -> NDArray[np.int64]:
    """Every sequence of ``length`` tokens over ``vocab_size``, [vocab_size**length, length]
    in lexicographic order (row index = the sequence read as a base-``vocab_size`` number)."""
    rows = list(itertools.product(range(vocab_size), repeat=length))
    return np.array(rows, dtype=np.int64).reshape(len(rows), length)


def logsumexp(values: Table) -> Table:
    """log Σ exp over the last axis, stable; a row of -inf gives -inf."""
    top = values.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(values - top).sum(axis=-1)) + top[..., 0]


def sequence_kl(logp: Table, ref_logp: Table) -> Table:
    """KL(π(·|x)‖π_ref(·|x)) per prompt [X]; completions π never emits add nothing."""
    prob = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.where(prob > 0, prob * (logp - ref_logp), 0.0).sum(axis=-1)


def expected_reward(logp: Table, reward: Table) -> Table:
    """E_π[r | x] per prompt [X]."""
    return (np.exp(logp) * reward).sum(axis=-1)


def objective(logp: Table, ref_logp: Table, reward: Table, beta: float) -> float:
    """J(π) = E_x[E_π[r] − β·KL]."""
    return float((expected_reward(logp, reward) - beta * sequence_kl(logp, ref_logp)).mean())


def tilted_logp(ref_logp: Table, reward: Table, inverse_beta: float) -> Table:
    """log π_τ(y|x) with π_τ ∝ π_ref·exp(τ·r), τ = 1/β (τ = inf: the reference on the
    reward's argmax set). Rewards are shifted by their per-prompt maximum first, so that a
    large τ never overflows and the KL stays accurate as τ grows."""
    shifted = reward - reward.max(axis=-1, keepdims=True)
    if math.isinf(inverse_beta):
        logits = np.where(shifted == 0, ref_logp, -math.inf)
    else:
        logits = ref_logp + inverse_beta * shifted
    return logits - logsumexp(logits)[:, None]


def optimal_logp(ref_logp: Table, reward: Table, beta: float) -> Table:
    """log π*(y|x), the maximiser of J for ``beta`` (β = 0: the limit β → 0)."""
    return tilted_logp(ref_logp, reward, math.inf if beta == 0 else 1.0 / beta)


def optimal_objective(ref_logp: Table, reward: Table, beta: float) -> float:
    """J* = E_x[β·log E_ref[exp(r/β)]] (β = 0: E_x[max r])."""
    top = reward.max(axis=-1)
    if beta == 0:
        return float(top.mean())
    shifted = (reward - top[:, None]) / beta
    return float((top + beta * logsumexp(ref_logp + shifted)).mean())


def _tilted_point(ref_logp: Table, reward: Table, log_inverse_beta: float,
                  ) -> tuple[float, float, float]:
    """Mean KL, mean reward and d(mean KL)/du of π_τ at u = log τ; dKL/dτ = τ·Var_τ(r)."""
    inverse_beta = math.exp(log_inverse_beta)
    logp = tilted_logp(ref_logp, reward, inverse_beta)
    prob = np.exp(logp)
    mean = (prob * reward).sum(axis=-1)
    variance = (prob * np.square(reward - mean[:, None])).sum(axis=-1)
    return (float(sequence_kl(logp, ref_logp).mean()), float(mean.mean()),
            inverse_beta**2 * float(variance.mean()))


def frontier_reward(ref_logp: Table, reward: Table, kl: float) -> float:
    """R_frontier(k): the highest mean reward of any policy whose mean KL is at most ``kl``.

    It is the reward of π_τ for the τ whose KL equals k (KL and reward both rise with τ): a
    bracket on u = log τ, then Newton steps on KL(u) = k that fall back to bisection when they
    leave the bracket. At k = 0 it is the reference's reward, and from the KL of the
    argmax-restricted reference (τ = inf) on it is the maximum reward."""
    kl_top, reward_top = _tilted_point_limit(ref_logp, reward)
    if kl >= kl_top:
        return reward_top
    if kl <= 0:
        return float(expected_reward(ref_logp, reward).mean())
    low, high = -math.inf, math.inf
    u = 0.0
    for _ in range(_BRACKET_STEPS):
        kl_u = _tilted_point(ref_logp, reward, u)[0]
        if kl_u < kl:
            low, u = u, u + _BRACKET_STEP
        else:
            high, u = u, u - _BRACKET_STEP
        if math.isfinite(low) and math.isfinite(high):
            break
    if not math.isfinite(high):  # the KL of π_τ approaches kl_top only as τ → inf
        return _tilted_point(ref_logp, reward, low)[1]
    if not math.isfinite(low):  # k below what τ = 10^-40 gives: the reference itself
        return _tilted_point(ref_logp, reward, high)[1]
    u = 0.5 * (low + high)
    for _ in range(_ROOT_STEPS):
        kl_u, reward_u, slope = _tilted_point(ref_logp, reward, u)
        if abs(kl_u - kl) <= _KL_TOLERANCE * max(kl, 1.0) or high - low <= 1e-15 * max(1.0, abs(u)):
            return reward_u
        if kl_u < kl:
            low = u
        else:
            high = u
        step = u - (kl_u - kl) / slope if slope > 0 else math.nan
        u = step if low < step < high else 0.5 * (low + high)
    return reward_u


def _tilted_point_limit(ref_logp: Table, reward: Table) -> tuple[float, float]:
    """Mean KL and mean reward of π_τ as τ → inf (the reference on the argmax set)."""
    logp = tilted_logp(ref_logp, reward, math.inf)
    return (float(sequence_kl(logp, ref_logp).mean()),
            float(expected_reward(logp, reward).mean()))


def exact_metrics(logp: Table, ref_logp: Table, reward: Table,
                  beta_seq: float) -> dict[str, float]:
    """The ``exact/*`` figures of a policy, for the sequence-level coefficient ``beta_seq``.

    improvement_left = (J* − J)/(J* − J_ref) is the share of the gain over the reference
    (J_ref = the reference's reward, its KL being 0) that the policy leaves on the table;
    NaN where no policy beats the reference (a constant reward)."""
    logp, ref_logp, reward = (np.asarray(a, dtype=np.float64) for a in (logp, ref_logp, reward))
    kl = float(sequence_kl(logp, ref_logp).mean())
    mean_reward = float(expected_reward(logp, reward).mean())
    j_run = mean_reward - beta_seq * kl
    j_star = optimal_objective(ref_logp, reward, beta_seq)
    j_ref = float(expected_reward(ref_logp, reward).mean())
    best = optimal_logp(ref_logp, reward, beta_seq)
    gain = j_star - j_ref
    return {
        "exact/kl": kl,
        "exact/reward": mean_reward,
        "exact/objective": j_run,
        "exact/optimal_objective": j_star,
        "exact/optimal_kl": float(sequence_kl(best, ref_logp).mean()),
        "exact/optimal_reward": float(expected_reward(best, reward).mean()),
        "exact/frontier_gap": frontier_reward(ref_logp, reward, kl) - mean_reward,
        "exact/improvement_left": (j_star - j_run) / gain if gain > 0 else math.nan,
        "exact/beta_seq": float(beta_seq),
    }
