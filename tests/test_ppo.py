"""PPO: per-token rewards, GAE, whitening, clipped policy and value losses on hand-computed
values, and the real command end to end."""

from __future__ import annotations

import math

import pytest
import torch

from klsweep.algos.common import clipped_surrogate
from klsweep.algos.ppo import (
    approx_kl,
    clipped_value_loss,
    explained_variance,
    gae,
    token_rewards,
    whiten,
)
from klsweep.config import ConfigError, compose_and_validate
from tests.conftest import run_and_read


def test_token_rewards_put_the_score_on_the_last_token_and_minus_beta_kl_on_every_token():
    scores = torch.tensor([1.0, 2.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    expected = torch.tensor([[-0.05, -0.10, 1.0 - 0.15], [-0.20, 2.0 - 0.25, 0.0]])
    torch.testing.assert_close(token_rewards(scores, mask, kl, beta=0.5), expected)
    torch.testing.assert_close(token_rewards(scores, mask),
                               torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))


def test_gae_matches_a_hand_computed_sequence():
    # γ = 0.9, λ = 0.8, so γλ = 0.72. Row 0 (3 tokens, V = .5 .6 .7, reward 1 at the end):
    #   δ2 = 1 − .7 = .3;  δ1 = .9·.7 − .6 = .03;  δ0 = .9·.6 − .5 = .04
    #   A2 = .3;  A1 = .03 + .72·.3 = .246;  A0 = .04 + .72·.246 = .21712
    # Row 1 ends after 2 tokens (what lies beyond the mask must not leak in):
    #   δ1 = 2 − 1 = 1;  δ0 = .9·1 − 1 = −.1;  A1 = 1;  A0 = −.1 + .72 = .62
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.21712, 0.246, 0.3],
                                                         [0.62, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.71712, 0.846, 1.0],
                                                      [1.62, 2.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return_minus_the_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[1.2, 1.1, 1.3, 1.0]])
    torch.testing.assert_close(returns, reward_to_go)
    torch.testing.assert_close(advantages, reward_to_go - values)


def test_whiten_gives_zero_mean_unit_unbiased_variance_over_the_mask():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    white = whiten(values, mask)
    inside = white[mask]
    # masked values 1 2 3 4: mean 2.5, unbiased variance 5/3
    torch.testing.assert_close(inside, (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5)
                               / math.sqrt(5 / 3), atol=1e-6, rtol=1e-6)
    assert white[~mask].abs().max() == 0
    torch.testing.assert_close(whiten(values, mask, shift_mean=False)[mask], inside + 2.5)


def test_clipped_policy_loss_on_hand_computed_values():
    # ratios 1.5, 0.5, 0.5, 1.5 against advantages +1, −1, +1, −1 with ε = 0.2:
    #   +1·1.5 clipped to 1.2 (no credit past 1+ε)     -> loss −1.2, clipped
    #   −1·0.5 clipped to −0.8 (pessimistic: the min)  -> loss  0.8, clipped
    #   +1·0.5: the unclipped 0.5 is the smaller       -> loss −0.5
    #   −1·1.5: the unclipped −1.5 is the smaller      -> loss  1.5
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    old_logp = torch.full((1, 4), -1.0)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, got_ratio, clipped = clipped_surrogate(old_logp + ratio.log(), old_logp, advantages,
                                                 clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -0.5, 1.5]]))
    torch.testing.assert_close(got_ratio, ratio)
    assert clipped.tolist() == [[True, True, False, False]]


def test_clipped_value_loss_on_hand_computed_values():
    # V_old = .5, R = 1, clip .2:
    #   V = 1.0: (V−R)² = 0,   V_clip = .7, (.3)² = .09 -> max .09, the clipped term wins
    #   V = 0.6: (V−R)² = .16, V_clip = .6              -> .16
    #   V = 0.0: (V−R)² = 1,   V_clip = .3, (.7)² = .49 -> 1
    values = torch.tensor([[1.0, 0.6, 0.0]])
    old_values = torch.full((1, 3), 0.5)
    returns = torch.ones(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clipfrac = clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.09 + 0.16 + 1.0) / 3))
    torch.testing.assert_close(clipfrac, torch.tensor(1 / 3))
    plain, _ = clipped_value_loss(values, old_values, returns, mask, clip=None)
    torch.testing.assert_close(plain, torch.tensor(0.5 * (0.0 + 0.16 + 1.0) / 3))


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(returns, 2.5), returns, mask)) == \
        pytest.approx(0.0)


def test_approx_kl_is_zero_on_policy_and_k3_of_the_ratio_otherwise():
    old = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert float(approx_kl(old, old, mask)) == 0.0
    new = old + torch.tensor([[0.1, -0.3]])
    expected = ((math.exp(0.1) - 1 - 0.1) + (math.exp(-0.3) - 1 + 0.3)) / 2
    assert float(approx_kl(new, old, mask)) == pytest.approx(expected, rel=1e-5)


def test_minibatches_beyond_the_rollouts_per_step_fail_before_training():
    with pytest.raises(ConfigError, match="algo.minibatches"):
        compose_and_validate({"algo": "ppo", "algo.minibatches": "1000"})


@pytest.mark.slow
def test_ppo_command_runs_and_logs_value_and_kl_metrics(tmp_path):
    summary, rows = run_and_read(tmp_path / "reward", "algo=ppo", "steps=3")
    assert summary["status"] == "completed" and summary["placement"] == "reward"
    assert len(rows) == 3
    for key in ("value/loss", "value/explained_variance", "policy/approx_kl",
                "policy/clipfrac", "kl/mean", "kl/seq", "kl/k3", "reward/mean", "kl/beta"):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as π_ref
    assert rows[-1]["kl/k3"] > 0


@pytest.mark.slow
def test_ppo_without_a_penalty_still_measures_kl(tmp_path):
    summary, rows = run_and_read(tmp_path / "none", "algo=ppo", "steps=2", "kl.placement=none",
                         "algo.minibatches=2")
    assert summary["status"] == "completed" and summary["placement"] == "none"
    assert rows[-1]["kl/k3"] > 0 and rows[-1]["loss/kl"] == 0.0
