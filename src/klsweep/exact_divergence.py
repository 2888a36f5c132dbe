"""Exact optimum of an f-divergence-regularised objective over enumerated completions.

J(π) = E_x[E_π[r] − β·D(π)] with D one of two things (``unit``):
* ``sequence``: D_f(π(·|x)‖π_ref(·|x)) over whole completions. Its maximiser is
  π*(y) = π_ref(y)·(f′)⁻¹((r(y) − λ)/β), clipped at 0 where f′'s range demands (χ²), with λ
  the one scalar that makes π* sum to one (found by bisection: the sum falls as λ rises).
* ``token``: Σ_t E_π[D_f(π(·|s_t)‖π_ref(·|s_t))], the per-position divergence summed along the
  completion. Only the KL has a chain rule that makes it the sequence divergence; for the
  others the maximiser comes from backward induction over the prefix tree: a prefix's value
  is the same one-scalar problem with its children's values as rewards, and the leaves'
  values are the rewards.

Tables are [X, Y] as in klsweep.exact_math, Y = V^L completions in lexicographic order (row
index = the completion read as a base-V number), so the children of a prefix are V
consecutive entries. The math runs in float64 torch, the Divergence functions' type.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from klsweep.exact_math import expected_reward, sequence_kl
from klsweep.kl.divergences import Divergence, ReverseKL

UNITS = ("token", "sequence")
# bisection halvings of λ's bracket: 200 reach adjacent floats from any bracket we start
_BISECTIONS = 200


def _divergence_rows(div: Divergence, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """D_f(p‖q) of each row [..., K] of log-probabilities -> [...]; entries with q = 0
    (outside π_ref's support) are left out, where f(u)·q is taken as its limit 0."""
    log_u = logp - ref_logp
    terms = torch.exp(ref_logp) * div.f(log_u)
    return torch.where(torch.isneginf(ref_logp), torch.zeros_like(terms), terms).sum(-1)


def solve_rows(div: Divergence, ref_logp: Tensor, reward: Tensor,
               beta: float) -> tuple[Tensor, Tensor]:
    """The one-scalar problem on each row of [R, K]: max_p Σ p·r − β·D_f(p‖q), q = exp(ref_logp).
    Returns (log p* [R, K], its value [R]). β = 0: q restricted to the row's best rewards."""
    if beta == 0:
        top = reward == reward.max(-1, keepdim=True).values
        logits = torch.where(top, ref_logp, torch.full_like(ref_logp, -math.inf))
        logp = logits - torch.logsumexp(logits, -1, keepdim=True)
        return logp, (torch.exp(logp) * reward).sum(-1)
    log_at_one = float(div.f_prime(torch.zeros((), dtype=torch.float64)))
    # λ = r − β·f′(1) gives u = 1: at the row's largest reward every u ≤ 1 (sum ≤ 1), at its
    # smallest every u ≥ 1 (sum ≥ 1)
    high = reward.max(-1).values - beta * log_at_one
    low = reward.min(-1).values - beta * log_at_one

    def log_mass(lam: Tensor) -> Tensor:
        u = div.f_prime_inverse((reward - lam[:, None]) / beta)
        return torch.logsumexp(ref_logp + torch.log(u), -1)

    for _ in range(_BISECTIONS):
        mid = 0.5 * (low + high)
        above = log_mass(mid) > 0  # too much mass: λ must rise
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    lam = high  # the side whose mass is at most one: finite u everywhere
    logp = ref_logp + torch.log(div.f_prime_inverse((reward - lam[:, None]) / beta))
    logp = logp - torch.logsumexp(logp, -1, keepdim=True)  # the last ulp of the bracket
    value = (torch.exp(logp) * reward).sum(-1) - beta * _divergence_rows(div, logp, ref_logp)
    return logp, value


def _tensor(table: NDArray[np.float64]) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.float64))


def _prefix_logp(logp: Tensor, vocab_size: int) -> list[Tensor]:
    """log π of every prefix by length: entry t is [X, V^t] (t = 0 … L)."""
    levels = [logp]
    while levels[-1].shape[-1] > 1:
        last = levels[-1]
        levels.append(torch.logsumexp(last.reshape(last.shape[0], -1, vocab_size), -1))
    return levels[::-1]


def _conditionals(prefix: list[Tensor], vocab_size: int) -> list[Tensor]:
    """log π(a|s) at each depth t: [X, V^t, V] (t = 0 … L−1); −inf below a prefix of
    probability zero (no position there is ever reached)."""
    out = []
    for parent, child in zip(prefix[:-1], prefix[1:], strict=True):
        cond = child.reshape(child.shape[0], -1, vocab_size) - parent[..., None]
        out.append(torch.where(torch.isneginf(parent[..., None]), torch.full_like(cond, -math.inf),
                               cond))
    return out


def sequence_divergence(div: Divergence, logp: NDArray, ref_logp: NDArray) -> NDArray:
    """D_f(π(·|x)‖π_ref(·|x)) per prompt [X]."""
    return _divergence_rows(div, _tensor(logp), _tensor(ref_logp)).numpy()


def token_divergence(div: Divergence, logp: NDArray, ref_logp: NDArray,
                     vocab_size: int) -> NDArray:
    """Σ_t E_π[D_f(π(·|s_t)‖π_ref(·|s_t))] per prompt [X]: each depth's per-prefix divergence
    weighed by the policy's probability of reaching the prefix."""
    prefix = _prefix_logp(_tensor(logp), vocab_size)
    ref_prefix = _prefix_logp(_tensor(ref_logp), vocab_size)
    total = torch.zeros(prefix[0].shape[0], dtype=torch.float64)
    for reach, cond, ref_cond in zip(prefix[:-1], _conditionals(prefix, vocab_size),
                                     _conditionals(ref_prefix, vocab_size), strict=True):
        per_prefix = _divergence_rows(div, cond, ref_cond)
        weight = torch.exp(reach)
        total += torch.where(weight > 0, weight * per_prefix, torch.zeros_like(weight)).sum(-1)
    return total.numpy()


def divergence(div: Divergence, unit: str, logp: NDArray, ref_logp: NDArray,
               vocab_size: int) -> NDArray:
    """The regulariser of ``unit`` per prompt [X]."""
    if unit == "sequence":
        return sequence_divergence(div, logp, ref_logp)
    if unit == "token":
        return token_divergence(div, logp, ref_logp, vocab_size)
    raise ValueError(f"unknown unit {unit!r} (allowed: {', '.join(UNITS)})")


def sequence_optimum(div: Divergence, ref_logp: NDArray, reward: NDArray,
                     beta: float) -> tuple[NDArray, NDArray]:
    """(log π* [X, Y], J* per prompt [X]) for the sequence-unit divergence."""
    logp, value = solve_rows(div, _tensor(ref_logp), _tensor(reward), beta)
    return logp.numpy(), value.numpy()


def token_optimum(div: Divergence, ref_logp: NDArray, reward: NDArray, beta: float,
                  vocab_size: int) -> tuple[NDArray, NDArray]:
    """(log π* [X, Y], J* per prompt [X]) for the token-unit divergence, by backward
    induction: at depth t every prefix solves its one-scalar problem with its children's
    values as rewards; π* of a completion is the product of its conditionals."""
    n_prompts = ref_logp.shape[0]
    ref_cond = _conditionals(_prefix_logp(_tensor(ref_logp), vocab_size), vocab_size)
    value = _tensor(reward)
    policy_cond = []
    for cond in reversed(ref_cond):  # depth L−1 … 0
        logp, value = solve_rows(div, cond.reshape(-1, vocab_size),
                                 value.reshape(-1, vocab_size), beta)
        policy_cond.append(logp.reshape(n_prompts, -1))
        value = value.reshape(n_prompts, -1)
    n_completions = ref_logp.shape[1]
    logp = torch.zeros(n_prompts, n_completions, dtype=torch.float64)
    for cond in policy_cond:  # [X, V^(t+1)]: each completion reads its prefix's entry
        logp += cond.repeat_interleave(n_completions // cond.shape[1], dim=1)
    return logp.numpy(), value[:, 0].numpy()


def optimum(div: Divergence, unit: str, ref_logp: NDArray, reward: NDArray, beta: float,
            vocab_size: int) -> tuple[NDArray, NDArray]:
    """(log π*, J* per prompt) of ``unit``'s objective."""
    if unit == "sequence":
        return sequence_optimum(div, ref_logp, reward, beta)
    if unit == "token":
        return token_optimum(div, ref_logp, reward, beta, vocab_size)
    raise ValueError(f"unknown unit {unit!r} (allowed: {', '.join(UNITS)})")


def divergence_metrics(div: Divergence, unit: str, logp: NDArray, ref_logp: NDArray,
                       reward: NDArray, beta_seq: float, vocab_size: int,
                       kl_metrics: dict[str, float]) -> dict[str, float]:
    """The ``exact/*`` figures that score a run against the optimum of its own divergence and
    unit: ``exact/divergence`` (its value, mean over prompts), ``exact/objective``,
    ``exact/optimal_objective``, ``exact/optimal_divergence``, ``exact/optimal_reward``,
    ``exact/optimal_kl`` and ``exact/improvement_left`` = (J* − J)/(J* − J_ref).
    ``kl_metrics`` are exact_math's reverse-KL figures of the same run: for the KL they are
    already these (the chain rule makes both units one objective, with a closed form), so
    only ``exact/divergence`` is added; ``exact/kl`` stays the reverse KL in every run."""
    if isinstance(div, ReverseKL):
        return {"exact/divergence": kl_metrics["exact/kl"]}
    value = float(divergence(div, unit, logp, ref_logp, vocab_size).mean())
    mean_reward = kl_metrics["exact/reward"]
    best, j_star_rows = optimum(div, unit, ref_logp, reward, beta_seq, vocab_size)
    j_star = float(j_star_rows.mean())
    j_run = mean_reward - beta_seq * value
    gain = j_star - float(expected_reward(ref_logp, reward).mean())
    return {
        "exact/divergence": value,
        "exact/objective": j_run,
        "exact/optimal_objective": j_star,
        "exact/optimal_divergence": float(divergence(div, unit, best, ref_logp,
                                                     vocab_size).mean()),
        "exact/optimal_reward": float(expected_reward(best, reward).mean()),
        "exact/optimal_kl": float(sequence_kl(best, ref_logp).mean()),
        "exact/improvement_left": (j_star - j_run) / gain if gain > 0 else math.nan,
    }
