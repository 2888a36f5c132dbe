"""The policy pair alone, on CPU: what it samples, how it scores a rollout under both models,
the KL values and the loss-placed KL term its settings ask for, and what a step logs."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import replace

import pytest
import torch

from klsweep.config import choice_config, compose_and_validate
from klsweep.kl import ESTIMATORS, masked_mean
from klsweep.models.tiny import TinyGPT
from klsweep.policy import KLConfig, PolicyPair
from klsweep.rollout import Prompts, Rollout, token_logprobs
from klsweep.schema import from_node

V, EOS, P, N = 8, 7, 4, 6  # vocabulary, its EOS, prompt width, completion tokens


@functools.cache
def _default_kl() -> KLConfig:
    """The ``kl`` node of the default run, as the pair receives it."""
    return from_node(KLConfig, compose_and_validate({}).kl)


def _model(seed: int, peak: float = 20.0) -> TinyGPT:
    """A random one-layer model; tied embeddings scaled by ``peak`` make its next-token
    distributions far from uniform, so that two seeds differ by a sizeable KL."""
    torch.manual_seed(seed)
    model = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=32),
                    vocab_size=V, block_size=P + N)
    with torch.no_grad():
        model.wte.weight.mul_(peak)
    return model


def _pair(policy: TinyGPT, reference: TinyGPT, temperature: float = 1.0, **kl) -> PolicyPair:
    return PolicyPair(policy, reference, replace(_default_kl(), **kl), temperature=temperature,
                      max_new_tokens=N, eos_id=EOS)


def _prompts(n: int, seed: int = 0) -> Prompts:
    generator = torch.Generator().manual_seed(seed)
    prompts = Prompts.unpadded(torch.randint(0, EOS, (n, P), generator=generator))
    return Prompts(prompts.tokens, prompts.mask, index=torch.arange(10, 10 + n))


def _distinct_pair(**kl) -> PolicyPair:
    """π ≠ π_ref: two random models."""
    return _pair(_model(0, peak=5.0), _model(1), **kl)


# --- sampling ---------------------------------------------------------------------------------
def test_sample_groups_completions_by_prompt_and_masks_everything_after_eos():
    pair = _distinct_pair()
    prompts = _prompts(3)
    torch.manual_seed(0)
    rollout = pair.sample(prompts, n_per_prompt=8)

    assert rollout.tokens.shape == (24, P + N) and rollout.group_size == 8
    torch.testing.assert_close(rollout.prompts, prompts.tokens.repeat_interleave(8, dim=0))
    torch.testing.assert_close(rollout.prompt_index, prompts.index.repeat_interleave(8))
    ended = 0
    for completion, mask, old_logp in zip(rollout.completions, rollout.mask, rollout.old_logp,
                                          strict=True):
        eos = (completion == EOS).nonzero()
        length = int(eos[0]) + 1 if len(eos) else N  # up to and including the first EOS
        ended += length < N
        assert mask.tolist() == [t < length for t in range(N)]
        assert (completion[length:] == EOS).all()  # a finished row keeps emitting EOS
        assert (old_logp[length:] == 0).all() and (old_logp[:length] < 0).all()
    assert 0 < ended < 24  # both kinds of row occur, so the mask was really tested


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_old_logp_is_the_scored_policy_logp_at_the_sampling_temperature(temperature):
    pair = _pair(_model(0, peak=5.0), _model(1), temperature=temperature)
    torch.manual_seed(1)
    rollout = pair.sample(_prompts(3), n_per_prompt=4)
    scored = pair.score(rollout, grad=False)

    mask = rollout.mask
    torch.testing.assert_close(rollout.old_logp[mask], scored.logp[mask], rtol=0, atol=1e-5)
    # both models' logits are divided by the temperature the tokens were drawn at
    for model, logits in ((pair.policy, scored.logits), (pair.reference, scored.ref_logits)):
        with torch.no_grad():
            raw = model.completion_logits(rollout.tokens, None, rollout.prompt_len)
        torch.testing.assert_close(logits, raw / temperature, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored.ref_logp, token_logprobs(scored.ref_logits,
                                                               rollout.completions))


def test_score_gives_the_policy_logp_a_gradient_and_the_reference_none():
    pair = _distinct_pair()
    torch.manual_seed(2)
    rollout = pair.sample(_prompts(2), n_per_prompt=3)
    scored = pair.score(rollout)
    assert scored.logp.requires_grad and scored.logits.requires_grad
    assert not scored.ref_logp.requires_grad and not scored.ref_logits.requires_grad

    # the reference's parameters still require grad here: the pair itself keeps it frozen
    assert all(p.requires_grad for p in pair.reference.parameters())
    masked_mean(scored.logp, scored.mask).backward()
    assert all(p.grad is None for p in pair.reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.policy.parameters())
    assert not pair.score(rollout, grad=False).logp.requires_grad


# --- the KL -----------------------------------------------------------------------------------
def _scored(pair: PolicyPair, seed: int = 3):
    torch.manual_seed(seed)
    return pair.score(pair.sample(_prompts(4), n_per_prompt=4), grad=False)


def test_every_estimator_is_zero_when_the_policy_is_the_reference():
    reference = _model(1)
    for estimator in ESTIMATORS:
        pair = _pair(copy.deepcopy(reference), reference, estimator=estimator)
        scored = _scored(pair)
        values = pair.reward_penalty(scored.logp, scored.ref_logp, scored.logits,
                                     scored.ref_logits, scored.mask)
        torch.testing.assert_close(values, torch.zeros_like(values), rtol=0, atol=1e-6)
        measurement = pair.measure(scored, torch.rand(len(values)))
        kl_keys = [k for k in measurement.metrics if k.startswith("kl/")]
        assert set(kl_keys) >= {"kl/k1", "kl/k2", "kl/k3", "kl/abs", "kl/full", "kl/mean",
                                "kl/seq"}
        assert all(abs(measurement.metrics[k]) < 1e-6 for k in kl_keys), estimator
        assert abs(measurement.kl) < 1e-6


def _by_hand(estimator: str, scored) -> torch.Tensor:
    """Schulman's estimators on l = log π − log π_ref, and the exact KL over the vocabulary."""
    log_ratio = scored.logp - scored.ref_logp
    if estimator == "full":
        logp_all = torch.log_softmax(scored.logits, -1)
        ref_logp_all = torch.log_softmax(scored.ref_logits, -1)
        return (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    return {"k1": log_ratio, "k2": log_ratio.square() / 2,
            "k3": torch.exp(-log_ratio) - 1 + log_ratio, "abs": log_ratio.abs()}[estimator]


@pytest.mark.parametrize("unit", ["token", "sequence"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_reward_penalty_and_measure_follow_the_configured_estimator_and_unit(estimator, unit):
    pair = _distinct_pair(estimator=estimator, unit=unit)
    scored = _scored(pair)
    mask = scored.mask
    expected = _by_hand(estimator, scored)
    values = pair.reward_penalty(scored.logp, scored.ref_logp, scored.logits,
                                     scored.ref_logits, scored.mask)
    torch.testing.assert_close(values[mask], expected[mask], rtol=1e-5, atol=1e-6)

    rewards = torch.rand(mask.shape[0])
    measurement = pair.measure(scored, rewards)
    m = measurement.metrics
    per_token = float((expected * mask).sum() / mask.sum())  # over every completion token
    per_sequence = float((expected * mask).sum(1).mean())  # summed per sequence, then mean
    assert m["kl/mean"] == pytest.approx(per_token, rel=1e-5, abs=1e-7)
    assert m["kl/seq"] == pytest.approx(per_sequence, rel=1e-5, abs=1e-7)
    assert m[f"kl/{estimator}"] == pytest.approx(per_token, rel=1e-5, abs=1e-7)
    assert per_sequence > 1.5 * per_token  # completions are long enough to tell units apart
    assert measurement.kl == (m["kl/mean"] if unit == "token" else m["kl/seq"])
    assert measurement.n_samples == m["perf/samples"] == mask.shape[0]
    assert m["perf/tokens"] == mask.sum() and m["reward/mean"] == pytest.approx(rewards.mean())


# a hand-sized case: log π = (−0.5, −1.2), log π_ref = (−0.9, −0.7), so l = (0.4, −0.5)
LOGP, REF_LOGP = (-0.5, -1.2), (-0.9, -0.7)
L_RATIO = (0.4, -0.5)
K3 = tuple(math.exp(-x) - 1 + x for x in L_RATIO)


def _loss_term(pair: PolicyPair, old_logp: tuple[float, float] = LOGP):
    logp = torch.tensor(LOGP, requires_grad=True)
    unused_logits = torch.zeros(2, V)  # only estimator=full reads logits
    term = pair.kl_loss_term(logp, torch.tensor(REF_LOGP), unused_logits, unused_logits,
                             torch.tensor(old_logp))
    term.sum().backward()
    return term.detach(), logp.grad


def test_k2_gradient_keeps_k3_s_value_and_takes_k2_s_gradient():
    model = _model(0)
    # without GRPO's default importance correction, which adds k·∇log π of its own
    value, grad = _loss_term(_pair(model, model, estimator="k3", gradient="k2",
                                   is_correction=False))
    torch.testing.assert_close(value, torch.tensor(K3))
    torch.testing.assert_close(grad, torch.tensor(L_RATIO))  # d(l²/2)/d log π = l
    # the estimator's own gradient differs: d k3/d log π = 1 − exp(−l)
    value, grad = _loss_term(_pair(model, model, estimator="k3", gradient="estimator",
                                   is_correction=False))
    torch.testing.assert_close(value, torch.tensor(K3))
    torch.testing.assert_close(grad, torch.tensor([1 - math.exp(-x) for x in L_RATIO]))


def test_is_correction_weighs_the_loss_term_by_the_ratio_to_the_sampler_with_its_gradient():
    model = _model(0)
    old_logp = (-0.6, -1.0)
    ratio = torch.tensor([math.exp(a - b) for a, b in zip(LOGP, old_logp, strict=True)])
    # ∇(ρ·k3) = ρ·k3 + ρ·(1 − e^−l) = ρ·l: the ratio's gradient turns k3's into the
    # reverse-KL one (TRL's use_bias_correction_kl)
    value, grad = _loss_term(_pair(model, model, estimator="k3", is_correction=True), old_logp)
    torch.testing.assert_close(value, ratio * torch.tensor(K3))
    torch.testing.assert_close(grad, ratio * torch.tensor(L_RATIO))
    value, grad = _loss_term(_pair(model, model, estimator="k3", is_correction=False), old_logp)
    torch.testing.assert_close(value, torch.tensor(K3))  # without it, old_logp is not read


@pytest.mark.parametrize("clamp", [20.0, 5.0])
def test_a_huge_log_ratio_is_clamped_at_kl_clamp_before_k2_and_k3(clamp):
    model = _model(0)
    logp, ref_logp = torch.zeros(2), torch.tensor([-50.0, 50.0])  # l = ±50
    unused_logits = torch.zeros(2, V)
    c = clamp
    expected = {"k1": [50.0, -50.0], "abs": [50.0, 50.0], "k2": [c * c / 2] * 2,
                "k3": [math.exp(-c) - 1 + c, math.exp(c) - 1 - c]}
    for estimator, want in expected.items():
        pair = _pair(model, model, estimator=estimator, clamp=clamp)
        values = pair.reward_penalty(logp, ref_logp, unused_logits, unused_logits,
                                     torch.ones(2, dtype=torch.bool))
        term = pair.kl_loss_term(logp, ref_logp, unused_logits, unused_logits, logp)
        torch.testing.assert_close(values, torch.tensor(want), rtol=1e-6, atol=0)
        torch.testing.assert_close(term, torch.tensor(want), rtol=1e-6, atol=0)


# --- left padding -------------------------------------------------------------------------------
def test_a_left_padded_batch_scores_each_row_as_if_it_were_alone():
    pair = _distinct_pair()
    lengths = [2, 4, 3]
    pad = 3  # a real token: attending to it, or counting it as a position, changes the logits
    tokens = torch.full((3, P), pad)
    mask = torch.zeros(3, P, dtype=torch.bool)
    generator = torch.Generator().manual_seed(4)
    for row, length in enumerate(lengths):
        tokens[row, P - length:] = torch.randint(0, EOS, (length,), generator=generator)
        mask[row, P - length:] = True
    torch.manual_seed(5)
    rollout = pair.sample(Prompts(tokens, mask), n_per_prompt=2)  # sampled with the mask too
    grouped = pair.score(rollout, grad=False)  # each prompt computed once for its group
    ungrouped = pair.score(rollout.rows(torch.arange(6)), grad=False)

    for row in range(6):
        length = lengths[row // 2]
        alone = Rollout(tokens=torch.cat([tokens[row // 2, P - length:],
                                          rollout.completions[row]])[None],
                        prompt_mask=torch.ones(1, length, dtype=torch.bool),
                        mask=rollout.mask[row:row + 1], old_logp=rollout.old_logp[row:row + 1])
        single = pair.score(alone, grad=False)
        for batch in (grouped, ungrouped):
            torch.testing.assert_close(batch.logp[row], single.logp[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch.ref_logp[row], single.ref_logp[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch.logits[row], single.logits[0], rtol=0, atol=1e-5)
        # and the sampler, decoding the padded batch with its KV cache, saw the same model
        on = rollout.mask[row]
        torch.testing.assert_close(rollout.old_logp[row][on], single.logp[0][on], rtol=0,
                                   atol=1e-5)

