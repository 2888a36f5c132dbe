"""The exact task's math against brute force: the closed-form optimum, the frontier, J* ≥ J,
and best-of-n against Monte Carlo sampling and Beirami et al.'s KL bound."""

import math

import numpy as np
import pytest

from klsweep.exact_math import (
    BEST_OF_N,
    best_of_n_curve,
    best_of_n_kl_bound,
    best_of_n_logp,
    enumerate_completions,
    exact_metrics,
    expected_reward,
    frontier_reward,
    logsumexp,
    objective,
    optimal_logp,
    optimal_objective,
    sequence_kl,
    tilted_logp,
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


# Best-of-n toy: two prompts, six completions each, with tied rewards inside and across the top
BON_REF = np.log(np.array([[0.30, 0.05, 0.20, 0.15, 0.10, 0.20],
                           [0.10, 0.25, 0.05, 0.35, 0.15, 0.10]]))
BON_REWARD = np.array([[0.0, 1.0, 0.5, 1.0, 0.5, 0.2],
                       [0.3, 0.3, 0.9, 0.1, 0.9, 0.9]])


def _best_of_n_samples(rng: np.random.Generator, prompt: int, n: int, sets: int,
                       tie_break: str) -> np.ndarray:
    """The completion each of ``sets`` sets of n i.i.d. π_ref draws picks [sets]: the top
    reward, ties among the *draws* broken by the first one or by a uniformly chosen one."""
    prob = np.exp(BON_REF[prompt])
    draws = np.minimum(np.searchsorted(np.cumsum(prob), rng.random((sets, n))), prob.size - 1)
    rewards = BON_REWARD[prompt][draws]
    if tie_break == "first":
        pick = rewards.argmax(axis=1)
    else:  # uniform over the tied draws: the argmax of random keys among them
        keys = np.where(rewards == rewards.max(axis=1, keepdims=True), rng.random(draws.shape), -1)
        pick = keys.argmax(axis=1)
    return draws[np.arange(sets), pick]


@pytest.mark.parametrize("tie_break", ["first", "uniform"])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_best_of_n_matches_monte_carlo_with_ties_split_by_reference_probability(n, tie_break):
    # Both tie-breaks look only at the draws' rewards and positions; given which draws tie at
    # the top, each is a π_ref draw restricted to that level, so both give mass ∝ π_ref in it.
    # Tolerance 5 binomial sd per cell: 12 cells × 6 cases = 72 checks, a correct
    # implementation fails with probability < 72 × 5.7e-7 < 1e-4.
    sets = 40_000
    rng = np.random.default_rng(10 * n + (tie_break == "uniform"))
    exact = np.exp(best_of_n_logp(BON_REF, BON_REWARD, n))
    assert exact.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-12)
    for prompt in range(2):
        picked = _best_of_n_samples(rng, prompt, n, sets, tie_break)
        freq = np.bincount(picked, minlength=6) / sets
        tolerance = 5 * np.sqrt(exact[prompt] * (1 - exact[prompt]) / sets)
        assert (np.abs(freq - exact[prompt]) <= tolerance).all(), (prompt, freq, exact[prompt])
        # power: splitting a tied level evenly instead would be caught on this toy
        level = BON_REWARD[prompt] == BON_REWARD[prompt].max()
        even = np.where(level, exact[prompt][level].sum() / level.sum(), exact[prompt])
        assert (np.abs(freq - even) > tolerance).any()


def test_best_of_n_has_the_closed_form_level_law_and_a_constant_ratio_on_each_level():
    # P_bon(R = r) = F(r)ⁿ − F⁻(r)ⁿ, written out by hand for prompt 0: levels 0, 0.2, 0.5, 1
    # with reference masses 0.30, 0.20, 0.30, 0.20
    n = 5
    masses = np.array([0.30, 0.20, 0.30, 0.20])
    at_most = np.cumsum(masses)
    level_law = at_most**n - np.concatenate([[0.0], at_most[:-1]]) ** n
    prob = np.exp(best_of_n_logp(BON_REF, BON_REWARD, n))[0]
    assert [prob[0], prob[5], prob[2] + prob[4], prob[1] + prob[3]] == pytest.approx(
        level_law.tolist(), abs=1e-15)
    ratio = prob / np.exp(BON_REF[0])
    assert ratio[2] == pytest.approx(ratio[4], rel=1e-12)
    assert ratio[1] == pytest.approx(ratio[3], rel=1e-12)


def test_best_of_one_is_the_reference():
    logp = best_of_n_logp(BON_REF, BON_REWARD, 1)
    assert np.exp(logp) == pytest.approx(np.exp(BON_REF), abs=1e-15)
    ns, kl, reward = best_of_n_curve(BON_REF, BON_REWARD, [1])
    assert ns.tolist() == [1] and kl[0] == pytest.approx(0.0, abs=1e-15)
    assert reward[0] == pytest.approx(float(expected_reward(BON_REF, BON_REWARD).mean()), abs=1e-15)


def test_best_of_n_kl_is_below_beirami_bound_strictly_on_a_finite_set():
    # KL ≤ log n − (n−1)/n (Beirami et al. 2024) holds for every n, with ties and without, and
    # is strict for n ≥ 2: the bound is the KL of a reward law without atoms
    rng = np.random.default_rng(5)
    ref_logp = _random_logp(rng, (3, 40), 1.5)
    distinct = rng.random((3, 40))
    tied = np.round(distinct * 4) / 4  # five levels
    for ref, reward in ((ref_logp, distinct), (ref_logp, tied), (BON_REF, BON_REWARD)):
        ns, kl, mean_reward = best_of_n_curve(ref, reward)
        assert ns.tolist() == list(BEST_OF_N)
        bound = np.array([best_of_n_kl_bound(int(n)) for n in ns])
        assert kl[0] == pytest.approx(0.0, abs=1e-14)
        assert (kl[1:] < bound[1:]).all()
        assert (np.diff(kl) > 0).all() and (np.diff(mean_reward) > 0).all()
    # ties lower the KL: best-of-n sees only the level of each draw, and fewer levels say less
    kl_distinct = best_of_n_curve(ref_logp, distinct)[1]
    kl_tied = best_of_n_curve(ref_logp, tied)[1]
    assert (kl_tied[1:] < kl_distinct[1:]).all()


def test_best_of_n_kl_approaches_the_bound_as_the_reward_levels_get_finer():
    # uniform π_ref over Y distinct rewards: KL = Σ_k m_k·log(Y·m_k), m_k = (k/Y)ⁿ − ((k−1)/Y)ⁿ,
    # a Riemann sum of ∫ n·u^(n−1)·log(n·u^(n−1)) du = log n − (n−1)/n, so the gap shrinks with Y
    for n in (2, 16, 64):
        gaps = []
        for size in (6, 100, 10_000):
            ref_logp = np.full((1, size), -math.log(size))
            reward = np.linspace(0, 1, size)[None]
            kl = float(sequence_kl(best_of_n_logp(ref_logp, reward, n), ref_logp)[0])
            k = np.arange(1, size + 1)
            mass = (k / size) ** n - ((k - 1) / size) ** n
            assert kl == pytest.approx(float((mass * np.log(size * mass)).sum()), abs=1e-12)
            gaps.append(best_of_n_kl_bound(n) - kl)
        assert gaps[0] > gaps[1] > gaps[2] > 0
        assert gaps[2] < 1e-5


def test_best_of_many_is_the_reference_on_the_argmax_set_and_stays_below_the_frontier():
    # n → ∞ puts the mass F⁻(max)ⁿ → 0 off the top level; here F⁻(max) ≤ 0.8, 0.8^2000 ≈ 0
    limit = np.exp(tilted_logp(BON_REF, BON_REWARD, math.inf))
    assert np.exp(best_of_n_logp(BON_REF, BON_REWARD, 2000)) == pytest.approx(limit, abs=1e-15)
    # best-of-n is one policy per n: no better than the best policy at its KL
    _, kl, reward = best_of_n_curve(BON_REF, BON_REWARD, (1, 2, 3, 5, 8, 64))
    for kl_n, reward_n in zip(kl, reward, strict=True):
        assert reward_n <= frontier_reward(BON_REF, BON_REWARD, float(kl_n)) + 1e-9


def test_best_of_n_keeps_completions_the_reference_never_emits_at_zero():
    # the last completion's probability e^-900 underflows; its log does not
    ref_logp = np.array([[math.log(0.5), -math.inf, math.log(0.5), -900.0]])
    reward = np.array([[0.0, 1.0, 0.5, 2.0]])
    logp = best_of_n_logp(ref_logp, reward, 4)
    assert logp[0, 1] == -math.inf
    # the top level, mass q = e^-900, gets 1 − (1 − q)ⁿ = n·q: a log-ratio of log n
    assert logp[0, 3] - ref_logp[0, 3] == pytest.approx(math.log(4), abs=1e-12)
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_best_of_n_rejects_a_non_positive_or_non_integer_n(n):
    with pytest.raises(ValueError, match="best-of-n needs an integer n >= 1"):
        best_of_n_logp(BON_REF, BON_REWARD, n)
