"""GRPO's advantages and loss on hand-computed cases."""

import pytest
import torch

from klsweep.algos.common import aggregate, clipped_surrogate
from klsweep.algos.grpo import group_advantages, grpo_loss


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 6.0])
    # groups of 2: [1, 3] -> mean 2, std √2; [0, 0] -> 0; [2, 6] -> mean 4, std 2√2
    got = group_advantages(rewards, group_size=2, scale="group", eps=0.0)
    r2 = 2**0.5
    torch.testing.assert_close(got[[0, 1, 4, 5]], torch.tensor([-1 / r2, 1 / r2, -1 / r2, 1 / r2]))
    assert torch.isnan(got[2:4]).all()  # eps = 0 with equal rewards: what eps is there for
    safe = group_advantages(rewards, group_size=2, scale="group")
    torch.testing.assert_close(safe[2:4], torch.zeros(2))


def test_group_advantages_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    torch.testing.assert_close(group_advantages(rewards, 2, "none"), centred)
    torch.testing.assert_close(group_advantages(rewards, 2, "batch", eps=0.0),
                               centred / rewards.std())
    with pytest.raises(ValueError, match="allowed: group, batch, none"):
        group_advantages(rewards, 2, "max")


def test_aggregation_by_token_and_by_sequence():
    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(aggregate(values, mask, "token")) == pytest.approx((1 + 2 + 4) / 3)
    assert float(aggregate(values, mask, "sequence")) == pytest.approx((1.5 + 4) / 2)


def test_clipped_surrogate_takes_the_pessimistic_branch():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, ratio, clipped = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # ratio 1.5, A>0: min(1.5, 1.2) -> 1.2 (clipped); ratio 0.5, A<0: min(-0.5, -0.8) -> -0.8
    # (clipped); ratio 1.1 inside the range -> 2.2
    torch.testing.assert_close(loss, -torch.tensor([[1.2, -0.8, 2.2]]))
    assert clipped.tolist() == [[True, True, False]]
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5, 1.1]]))


def test_grpo_loss_on_a_hand_computed_batch():
    logp = torch.log(torch.tensor([[1.0, 1.0], [1.3, 1.0]])).requires_grad_()
    old = torch.zeros(2, 2)
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    kl = torch.tensor([[0.1, 0.3], [0.2, 7.0]])
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2, loss_agg="token", kl=kl,
                            beta=0.5)
    # tokens: (r=1, A=.5) -> -.5; (r=1, A=.5) -> -.5; (r=1.3, A=-2) -> -min(-2.6, -2.4) = 2.6
    policy = (-0.5 - 0.5 + 2.6) / 3
    kl_mean = (0.1 + 0.3 + 0.2) / 3
    assert float(stats["loss/policy"]) == pytest.approx(policy)
    assert float(stats["loss/kl"]) == pytest.approx(kl_mean)
    assert float(loss.detach()) == pytest.approx(policy + 0.5 * kl_mean)
    assert float(stats["policy/clipfrac"]) == pytest.approx(0.0)  # the unclipped branch won
    loss.backward()
    # d/d logp of -ρA at ρ=1 is -A, averaged over the 3 tokens
    torch.testing.assert_close(logp.grad[0], torch.tensor([-0.5 / 3, -0.5 / 3]))


def test_clip_higher_widens_only_the_upper_side_of_the_ratio():
    # DAPO's clip-higher: ratio 1.25 with A > 0 stays unclipped under ε_high = 0.28 (clipped
    # to 1.2 by ε = 0.2); ratio 0.75 with A < 0 is clipped to 0.8 either way
    logp = torch.log(torch.tensor([[1.25, 0.75]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, _, clipped = clipped_surrogate(logp, torch.zeros(1, 2), adv, clip_eps=0.2,
                                         clip_eps_high=0.28)
    torch.testing.assert_close(loss, -torch.tensor([[1.25, -0.8]]))
    assert clipped.tolist() == [[False, True]]
    symmetric, _, _ = clipped_surrogate(logp, torch.zeros(1, 2), adv, clip_eps=0.2)
    torch.testing.assert_close(symmetric, -torch.tensor([[1.2, -0.8]]))
