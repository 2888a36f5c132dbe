"""The off-policy corrections as pure functions: the policy-gradient term's importance weights
in TRL's four modes and AReaL's decoupled one (``rollout.correction``), what ``auto`` resolves
to, and the KL term's sequence ratio (``kl.is_correction=sequence``). The audit
(tests/test_audit.py) holds the KL forms to their targets; tests/test_lag.py runs them."""

import math

import pytest
import torch

from klsweep.engines.correction import (
    DEFAULT_CAP,
    LAGGED_DEFAULT,
    PolicyGradientCorrection,
    correction_weights,
    resolve,
    weight_metrics,
)
from klsweep.kl.divergences import prefix_ratio
from klsweep.models.tiny import TinyConfig, TinyGPT
from klsweep.rollout import Prompts, generate

# two sequences of three tokens; the second's last token is past EOS
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
BEHAVIOUR = torch.tensor([[-2.0, -1.0, -0.5], [-1.5, -1.2, 9.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_token_modes_truncate_or_mask_each_token_s_ratio_at_the_cap():
    ratio = torch.exp(TRAIN - BEHAVIOUR) * MASK  # e, e^-1, 1 | e^0.5, e^0.2, (masked)
    weights, raw, cut = correction_weights(TRAIN, BEHAVIOUR, MASK, "token_truncate", cap=2.0)
    assert torch.allclose(weights, ratio.clamp(max=2.0))
    assert cut.tolist() == [[True, False, False], [False, False, False]]
    masked, _, _ = correction_weights(TRAIN, BEHAVIOUR, MASK, "token_mask", cap=2.0)
    assert torch.allclose(masked, torch.where(ratio > 2.0, 0.0, ratio))
    assert torch.allclose(raw[MASK], ratio[MASK])


def test_sequence_modes_weigh_every_token_by_the_sequence_s_ratio():
    # log ratios summed over each sequence's completion tokens: 0 and 0.7
    weights, raw, cut = correction_weights(TRAIN, BEHAVIOUR, MASK, "sequence_truncate", cap=1.5)
    assert torch.allclose(raw[0], torch.ones(3))
    assert torch.allclose(raw[1, :2], torch.full((2,), math.exp(0.7)))
    assert torch.allclose(weights[1, :2], torch.full((2,), 1.5)) and weights[1, 2] == 0
    assert cut.tolist() == [[False, False, False], [True, True, False]]
    masked, _, _ = correction_weights(TRAIN, BEHAVIOUR, MASK, "sequence_mask", cap=1.5)
    assert masked.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_the_weights_carry_no_gradient_and_an_unknown_mode_is_refused():
    train = TRAIN.clone().requires_grad_(True)
    weights, _, _ = correction_weights(train, BEHAVIOUR, MASK, "token_truncate", cap=2.0)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="unknown correction 'nope'"):
        correction_weights(TRAIN, BEHAVIOUR, MASK, "nope", cap=2.0)


def test_the_metrics_are_the_mean_weight_the_largest_ratio_and_the_share_cut():
    weights, raw, cut = correction_weights(TRAIN, BEHAVIOUR, MASK, "token_truncate", cap=2.0)
    metrics = weight_metrics(weights, raw, cut, MASK)
    assert metrics["rollout/is_max"] == pytest.approx(math.e)
    assert metrics["rollout/is_cut"] == pytest.approx(1 / 5)
    assert metrics["rollout/is_mean"] == pytest.approx(float(weights[MASK].mean()))


def test_with_no_cut_the_weights_make_behaviour_samples_estimate_the_target_s_mean():
    # 200,000 draws of a 4-token distribution from a behaviour policy: with a cap above every
    # ratio, E_b[w·f] = E_π[f] within 5 standard errors, for the token and sequence modes
    target = torch.tensor([0.1, 0.2, 0.3, 0.4])
    behaviour = torch.tensor([0.25, 0.25, 0.25, 0.25])
    f = torch.tensor([1.0, -2.0, 3.0, 0.5])
    draws = torch.multinomial(behaviour, 200_000, replacement=True,
                              generator=torch.Generator().manual_seed(0))[:, None]
    mask = torch.ones_like(draws, dtype=torch.bool)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        weights, _, _ = correction_weights(target.log()[draws], behaviour.log()[draws], mask,
                                           mode, cap=10.0)
        values = (weights * f[draws]).squeeze(1)
        stderr = float(values.std()) / math.sqrt(values.numel())
        assert abs(float(values.mean()) - float(target @ f)) < 5 * stderr, mode


def test_auto_is_tis_where_a_cap_is_set_nothing_else_synchronously_and_the_default_lagged():
    assert resolve("auto", None, 0) == ("none", None)
    assert resolve("auto", 3.0, 0) == ("token_truncate", 3.0)  # as before the lag
    assert resolve("auto", None, 2) == (LAGGED_DEFAULT, DEFAULT_CAP)
    assert resolve("sequence_mask", None, 0) == ("sequence_mask", DEFAULT_CAP)
    assert resolve("none", 3.0, 1) == ("none", 3.0)


def test_the_prefix_ratio_is_the_product_of_the_ratios_before_each_token_detached():
    logp = TRAIN.clone().requires_grad_(True)
    ratio = prefix_ratio(logp, BEHAVIOUR, MASK, clamp=20.0)
    assert not ratio.requires_grad
    expected = [[1.0, math.e, 1.0], [1.0, math.exp(0.5), math.exp(0.7)]]
    assert torch.allclose(ratio, torch.tensor(expected))
    clamped = prefix_ratio(logp, BEHAVIOUR, MASK, clamp=0.6)
    assert torch.allclose(clamped[1], torch.tensor([1.0, math.exp(0.5), math.exp(0.6)]))


def tiny_policy(seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(TinyConfig("tiny", 1, 2, 16, 0.0), vocab_size=6,
                   block_size=8)


def test_decoupled_weighs_by_the_proximal_over_the_behaviour_and_steps_the_proximal():
    policy = tiny_policy(0)
    correction = PolicyGradientCorrection("decoupled", 5.0, policy, temperature=1.0)
    prompts = Prompts.unpadded(torch.tensor([[1, 2], [3, 4]]))
    rollout = generate(policy, prompts, n_per_prompt=2, max_new_tokens=3, eos_id=5)
    behaviour = rollout.old_logp - 0.1 * rollout.mask  # sampled by a slightly other policy
    rollout.engine_logp = behaviour
    proximal_logp = rollout.old_logp  # π_prox is the policy as it was built
    with torch.no_grad():  # the policy takes a step
        for p in policy.parameters():
            p.add_(0.05)
    first = correction(rollout, old_logp=torch.zeros_like(behaviour))
    assert torch.allclose(first.anchor, proximal_logp, atol=1e-5)
    assert torch.allclose(first.weights[rollout.mask],
                          torch.full((int(rollout.mask.sum()),), math.exp(0.1)), atol=1e-5)
    # π_prox has now stepped to the policy: the next call anchors the clip there
    second = correction(rollout, old_logp=torch.zeros_like(behaviour))
    assert not torch.allclose(second.anchor, first.anchor, atol=1e-3)
    state = correction.state_dict()
    fresh = PolicyGradientCorrection("decoupled", 5.0, tiny_policy(1), temperature=1.0)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.proximal.parameters(),
                                                 correction.proximal.parameters(), strict=True))


def test_without_another_sampler_s_log_probs_nothing_is_corrected():
    policy = tiny_policy(0)
    rollout = generate(policy, Prompts.unpadded(torch.tensor([[1, 2]])), n_per_prompt=2,
                       max_new_tokens=3, eos_id=5)
    for mode in ("token_truncate", "decoupled"):
        done = PolicyGradientCorrection(mode, 2.0, policy, 1.0)(rollout, rollout.old_logp)
        assert done.weights is None and done.anchor is None and done.metrics == {}
