"""pass@k (klsweep.pass_at_k): the estimator against brute force over k-subsets, against
Chen et al.'s formula on 0/1 scores, and, on the exact task, against the exact pass@k of a
policy by enumeration, within the estimator's standard error."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from klsweep.config import choice_config
from klsweep.models.tiny import TinyConfig, TinyGPT
from klsweep.pass_at_k import exact_pass_at_k, pass_at_k, pass_at_k_per_problem
from klsweep.rollout import Prompts, generate
from klsweep.tasks.exact import ExactTask


@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 1), (5, 2), (6, 6), (10, 3)])
def test_pass_at_k_is_the_mean_best_score_over_every_k_subset(n, k):
    scores = np.random.default_rng(n * 10 + k).integers(0, 5, size=(4, n)) / 4  # partial
    brute = [np.mean([max(subset) for subset in itertools.combinations(row, k)])
             for row in scores]
    np.testing.assert_allclose(pass_at_k_per_problem(scores, k), brute)


def test_on_zero_one_scores_it_is_chen_et_als_estimator():
    n, k = 16, 4
    correct = np.random.default_rng(0).random((50, n)) < 0.3
    chen = [1 - math.comb(n - int(c), k) / math.comb(n, k) for c in correct.sum(1)]
    assert pass_at_k(correct, k) == pytest.approx(float(np.mean(chen)))
    assert pass_at_k(correct, 1) == pytest.approx(float(correct.mean()))


def test_it_stays_finite_where_the_binomials_overflow():
    scores = np.zeros((1, 2000))
    scores[0, -1] = 1.0  # one success in 2000: pass@700 = 700/2000
    assert pass_at_k(scores, 700) == pytest.approx(0.35)


def test_the_estimator_matches_the_exact_pass_at_k_of_a_policy_by_enumeration():
    """An untrained tiny model on a 3-token, 2-position exact task: the exact pass@k is
    1 − (1 − p)^k with p its probability of the top-reward completion, summed over the 9
    completions of each prompt; the estimator's mean over R independent groups of n samples
    must be within 4 standard errors of it (R = 400 groups: SE ≈ 0.01)."""
    task = ExactTask(choice_config("task", "exact", vocab_size=3, completion_len=2,
                                   n_prompts=3, cache_dir="unused"))
    torch.manual_seed(0)
    model = TinyGPT(TinyConfig("tiny", 1, 2, 16, 0.0), task.vocab_size,
                    task.prompt_len + task.max_new_tokens).eval()
    with torch.no_grad():  # unequal logits, so that the prompts' p differ
        model.lm_head.weight.mul_(5.0)  # p ≈ 0.65, 0.10, 0.65
    temperature, n, groups = 1.0, 8, 400
    p_top = task.top_probability(task.sequence_logprobs(model, temperature))
    assert 0.05 < p_top.min() and p_top.max() < 0.95 and np.ptp(p_top) > 0.05

    prompts = task.prompts.repeat(groups, 1)  # group g of prompt x: row g·X + x
    rollout = generate(model, Prompts.unpadded(prompts), n_per_prompt=n,
                       max_new_tokens=task.max_new_tokens, eos_id=task.eos_id,
                       temperature=temperature)
    top = task.completion_reward(rollout.completions, rollout.mask) >= 1.0 - 1e-6
    scores = top.double().view(groups, len(task.prompts), n).numpy()
    for k in (1, 2, 4, 8):
        # each group's estimate over the X prompts: i.i.d. across groups, unbiased
        estimates = pass_at_k_per_problem(scores.reshape(-1, n), k).reshape(groups, -1).mean(1)
        standard_error = estimates.std(ddof=1) / math.sqrt(groups)
        assert abs(estimates.mean() - exact_pass_at_k(p_top, k)) < 4 * standard_error, k
