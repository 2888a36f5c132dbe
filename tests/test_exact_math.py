"""The exact task's math against brute force: the closed-form optimum, the frontier, J* ≥ J."""

import math

import numpy as np
import pytest

from klsweep.exact_math import (
    enumerate_completions,
    exact_metrics,
    expected_reward,
    frontier_reward,
    logsumexp,
    objective,
    optimal_logp,
    optimal_objective,
    sequence_kl,
)

# Two prompts, two completions each ("two-token toy"): a policy is one probability per prompt.
REF = np.log(np.array([[0.7, 0.3], [0.4, 0.6]]))
REWARD = np.array([[0.0, 1.0], [0.2, 0.9]])
GRID = 2001  # policies p = i/(GRID-1) per prompt; spacing h = 5e-4


def _policy_grid() -> np.ndarray:
    """log-probabilities [GRID-2, 2] of the two-completion policies of one prompt on the grid
    (the end points are left out: their log is -inf)."""
    p = np.linspace(0, 1, GRID)[1:-1]
    return np.stack([np.log1p(-p), np.log(p)], axis=-1)


def _per_prompt(logp: np.ndarray, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """KL and reward [G] of the grid policies for one prompt."""
    ref = np.broadcast_to(REF[prompt], logp.shape)
    reward = np.broadcast_to(REWARD[prompt], logp.shape)
    return sequence_kl(logp, ref), expected_reward(logp, reward)


def _random_logp(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    logits = scale * rng.standard_normal(shape)
    return logits - logsumexp(logits)[:, None]


def test_enumeration_is_lexicographic_and_complete():
    assert enumerate_completions(3, 2).tolist() == [[a, b] for a in range(3) for b in range(3)]
    assert enumerate_completions(2, 1).tolist() == [[0], [1]]


@pytest.mark.parametrize("beta", [0.25, 0.5, 2.0])
def test_closed_form_optimum_matches_brute_force_on_two_token_toy(beta):
    grid = _policy_grid()
    best_j, best_p = [], []
    for prompt in range(2):
        kl, reward = _per_prompt(grid, prompt)
        j = reward - beta * kl
        best_j.append(float(j.max()))
        best_p.append(float(np.exp(grid[j.argmax(), 1])))
    j_star = optimal_objective(REF, REWARD, beta)
    # J has zero slope at its interior maximum: a grid step h = 5e-4 costs O(h²·β/p(1-p))
    # < 1e-5 in J and at most h in the argmax
    assert j_star >= sum(best_j) / 2 - 1e-12
    assert j_star == pytest.approx(sum(best_j) / 2, abs=1e-5)
    pi_star = np.exp(optimal_logp(REF, REWARD, beta))
    assert pi_star[:, 1].tolist() == pytest.approx(best_p, abs=5e-4)
    assert objective(np.log(pi_star), REF, REWARD, beta) == pytest.approx(j_star, abs=1e-12)


@pytest.mark.parametrize("kl_level", [0.0, 0.01, 0.05, 0.2, 0.5])
def test_frontier_matches_brute_force_over_pairs_of_policies(kl_level):
    """The frontier is the best mean reward over *both* prompts' policies jointly at mean KL
    ≤ k: brute force over the grid of pairs also checks that one shared β is optimal."""
    grid = _policy_grid()
    kl0, r0 = _per_prompt(grid, 0)
    kl1, r1 = _per_prompt(grid, 1)
    mean_kl = (kl0[:, None] + kl1[None, :]) / 2
    mean_reward = (r0[:, None] + r1[None, :]) / 2
    reference = float(expected_reward(REF, REWARD).mean())
    brute = float(np.where(mean_kl <= kl_level, mean_reward, -np.inf).max(initial=reference))
    exact = frontier_reward(REF, REWARD, kl_level)
    # no grid policy beats the frontier; the grid falls short of it by at most the slope
    # dR/dk = β (< 1 here) times the KL the spacing wastes, far under 1e-3
    assert exact >= brute - 1e-9
    assert exact == pytest.approx(brute, abs=1e-3)


def test_frontier_is_monotone_concave_and_spans_reference_to_maximum():
    rng = np.random.default_rng(0)
    ref_logp = _random_logp(rng, (3, 50), 1.0)
    reward = rng.random((3, 50))
    levels = np.linspace(0, 6, 25)
    values = np.array([frontier_reward(ref_logp, reward, k) for k in levels])
    assert (np.diff(values) >= -1e-12).all()
    assert values[0] == pytest.approx(float(expected_reward(ref_logp, reward).mean()), abs=1e-12)
    assert values[-1] == pytest.approx(float(reward.max(-1).mean()), abs=1e-9)
    midpoints = (levels[1:] + levels[:-1]) / 2
    middles = np.array([frontier_reward(ref_logp, reward, k) for k in midpoints])
    assert (middles >= (values[1:] + values[:-1]) / 2 - 1e-9).all()


def test_the_optimum_lies_on_the_frontier_and_leaves_nothing():
    rng = np.random.default_rng(2)
    ref_logp = _random_logp(rng, (4, 30), 1.0)
    reward = rng.random((4, 30))
    for beta in (0.02, 0.1, 1.0):
        metrics = exact_metrics(optimal_logp(ref_logp, reward, beta), ref_logp, reward, beta)
        assert metrics["exact/frontier_gap"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["exact/improvement_left"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["exact/kl"] == pytest.approx(metrics["exact/optimal_kl"], abs=1e-12)
    reference = exact_metrics(ref_logp, ref_logp, reward, 0.1)
    assert reference["exact/improvement_left"] == pytest.approx(1.0, abs=1e-12)
    assert reference["exact/kl"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.1, 1.0])
def test_no_policy_beats_the_optimum_or_the_frontier(beta):
    rng = np.random.default_rng(4)
    ref_logp = _random_logp(rng, (4, 64), 2.0)
    reward = rng.random((4, 64))
    for scale in (0.1, 1.0, 5.0):  # near uniform, moderate, nearly deterministic
        for _ in range(10):
            metrics = exact_metrics(_random_logp(rng, (4, 64), scale), ref_logp, reward, beta)
            assert metrics["exact/optimal_objective"] >= metrics["exact/objective"] - 1e-12
            assert metrics["exact/frontier_gap"] >= -1e-9
            assert metrics["exact/improvement_left"] >= -1e-12


def test_beta_zero_optimum_is_reference_on_the_argmax_set():
    ref_logp = np.log(np.array([[0.5, 0.2, 0.3]]))
    reward = np.array([[1.0, 0.0, 1.0]])
    best = np.exp(optimal_logp(ref_logp, reward, 0.0))
    assert best[0].tolist() == pytest.approx([0.625, 0.0, 0.375])
    assert optimal_objective(ref_logp, reward, 0.0) == 1.0
    # J*(β) = max r − β·log(1/π_ref(argmax)) + O(exp(−1/β)) as β → 0
    assert optimal_objective(ref_logp, reward, 1e-3) == pytest.approx(
        1.0 - 1e-3 * math.log(1 / 0.8), abs=1e-12)
