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
shared by all prompts (the Lagrangian of a concave problem). Best-of-n over π_ref, the
inference-time baseline drawn beside it, is exact here too (``best_of_n_logp``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Table = NDArray[np.float64]

# the frontier's root search in u = log τ (τ = 1/β): the bracket grows by ×10 in τ, and the
# search stops when the KL is within _KL_TOLERANCE (relative) of its target
_BRACKET_STEP = math.log(10.0)
_BRACKET_STEPS = 40
_ROOT_STEPS = 100
_KL_TOLERANCE = 1e-13
# the n of the best-of-n curve: doublings up to 64, where log n − (n−1)/n ≈ 3.2 nats
BEST_OF_N = (1, 2, 4, 8, 16, 32, 64)


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


# τ = 1/β of the closed-form curves the report draws: the reference (0), then 10^-2 … 10^4
# in steps of 12%, then the argmax policy (∞); fine enough that interpolating between two
# points is within 1% (tests/test_report.py)
TAU_GRID = (0.0, *np.logspace(-2, 4, 120).tolist(), math.inf)


def tilted_curve(ref_logp: Table, tilt: Table,
                 measured: Sequence[Table]) -> tuple[Table, list[Table]]:
    """π*_τ ∝ π_ref·exp(τ·tilt) over ``TAU_GRID``: its mean sequence KL [K] and, for each
    table of ``measured``, its mean expected value [K] (over prompts)."""
    kl, values = [], []
    for tau in TAU_GRID:
        logp = tilted_logp(ref_logp, tilt, tau)
        kl.append(float(sequence_kl(logp, ref_logp).mean()))
        values.append([float(expected_reward(logp, table).mean()) for table in measured])
    return np.asarray(kl), list(np.asarray(values).T)


def best_of_n_logp(ref_logp: Table, reward: Table, n: int) -> Table:
    """log π_bon(y|x) [X, Y]: the law of the highest-reward completion among n i.i.d. draws
    from π_ref (-inf where it is zero).

    With the distinct reward levels of a prompt, F(r) = P_ref(R ≤ r) and F⁻(r) = P_ref(R < r),
    the best draw's reward is r with probability P_bon(R = r) = F(r)ⁿ − F⁻(r)ⁿ. Ties (rewards
    equal as floats) share that mass in proportion to π_ref:
    π_bon(y) = π_ref(y)·(F(r_y)ⁿ − F⁻(r_y)ⁿ)/P_ref(R = r_y). This is what any tie-break gets
    that looks only at the draws' rewards and positions, e.g. the first or a uniformly chosen
    one of the draws with the top reward: given which draws sit in the top level, each is an
    independent draw from π_ref restricted to it. (Choosing uniformly among the tied
    *distinct completions* drawn would not be.) π_bon/π_ref is thus constant on a level,
    so KL(π_bon‖π_ref) is the KL between the level laws, at most log n − (n−1)/n
    (``best_of_n_kl_bound``; Beirami et al. 2024). n = 1 is π_ref.

    Each level's mass is computed as F(r)ⁿ·(1 − (1 − q/F(r))ⁿ), q = P_ref(R = r), through
    log1p/expm1, so that a small level near the top keeps its relative precision instead of
    being the difference of two numbers close to 1. ``ref_logp`` is normalised per prompt
    first (it only matters to rounding for a table of log-probs)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1 (got {n!r})")
    log_ratio = np.empty_like(ref_logp)
    for x in range(ref_logp.shape[0]):
        _, level = np.unique(reward[x], return_inverse=True)  # levels in increasing reward
        log_q = _grouped_logsumexp(ref_logp[x], level)
        log_at_most = np.logaddexp.accumulate(log_q)
        # normalised by this very sum, so that the top level's F is exactly 1 (an error δ in
        # it would grow to n·δ in every level's mass); in log space throughout, so that a
        # level whose probability underflows keeps its share
        log_total = log_at_most[-1]
        log_q, log_at_most = log_q - log_total, log_at_most - log_total  # log q, log F(r)
        log_share = log_q - log_at_most  # log(q/F), 0 on the lowest level π_ref reaches
        with np.errstate(divide="ignore", invalid="ignore"):
            # log(1 − (1 − q/F)ⁿ); below e^-600 the share is n·q/F to all digits
            log_top = np.log(-np.expm1(n * np.log1p(-np.exp(log_share))))
            log_top = np.where(log_share < -600.0, math.log(n) + log_share, log_top)
            log_ratio[x] = (n * log_at_most + log_top - log_q)[level] - log_total
    # a level π_ref never reaches has a nan ratio: its completions stay at probability zero
    return np.where(np.isfinite(ref_logp), ref_logp + log_ratio, -math.inf)


def _grouped_logsumexp(values: NDArray[np.float64], group: NDArray[np.int64],
                       ) -> NDArray[np.float64]:
    """log Σ exp(values) within each group [max(group) + 1], stable; an empty or all -inf
    group gives -inf."""
    top = np.full(int(group.max()) + 1, -math.inf)
    np.maximum.at(top, group, values)
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.bincount(group, weights=np.exp(values - top[group]), minlength=top.size)
    with np.errstate(divide="ignore"):
        return np.log(total) + top


def best_of_n_kl_bound(n: int) -> float:
    """log n − (n−1)/n, Beirami et al. (2024)'s bound on KL(π_bon‖π_ref) in nats per sequence.

    It is the KL of best-of-n when no completion carries probability (a continuous reward
    law). On a finite set it is strict for n ≥ 2 and approached only as every reward level's
    reference mass goes to zero; tied rewards lower the KL further (merging levels is a
    coarser view of the same draws). As n → ∞ the KL tends instead to −log P_ref(R = max r),
    that of the reference on the argmax set."""
    return math.log(n) - (n - 1) / n


def best_of_n_curve(ref_logp: Table, reward: Table, ns: Sequence[int] = BEST_OF_N,
                    ) -> tuple[NDArray[np.int64], Table, Table]:
    """(n, KL(π_bon‖π_ref), E_bon[r]) for each n in ``ns``: KL in nats per sequence and both
    means over prompts, as ``sequence_kl`` and ``expected_reward`` give them for a policy."""
    kls, rewards = [], []
    for n in ns:
        logp = best_of_n_logp(ref_logp, reward, n)
        kls.append(float(sequence_kl(logp, ref_logp).mean()))
        rewards.append(float(expected_reward(logp, reward).mean()))
    return np.asarray(ns, dtype=np.int64), np.asarray(kls), np.asarray(rewards)
