"""KL estimators: each against its formula, and their statistics on known distributions."""

import math

import pytest
import torch

from klsweep.kl import (
    ESTIMATORS,
    estimators,
    kl_metrics,
    kl_penalty_per_token,
    kl_per_token,
    masked_mean,
)
from klsweep.kl.estimators import full_kl


def test_estimators_match_their_formulas():
    logp = torch.tensor([-0.1, -2.0, -0.7, -3.0])
    ref_logp = torch.tensor([-0.3, -1.0, -0.7, -0.5])
    l = logp - ref_logp
    expected = {"k1": l, "k2": 0.5 * l**2, "k3": torch.exp(-l) - 1 + l, "abs": l.abs()}
    for name, value in expected.items():
        torch.testing.assert_close(kl_per_token(logp, ref_logp, name), value)


def test_full_is_the_exact_kl_over_the_vocabulary():
    logits = torch.randn(3, 5, 7)
    ref_logits = torch.randn(3, 5, 7)
    p, q = logits.softmax(-1), ref_logits.softmax(-1)
    exact = (p * (p.log() - q.log())).sum(-1)
    dummy = torch.zeros(3, 5)
    got = kl_per_token(dummy, dummy, "full", logits=logits, ref_logits=ref_logits)
    torch.testing.assert_close(got, exact)


def test_full_needs_logits():
    with pytest.raises(ValueError, match="needs logits"):
        kl_per_token(torch.zeros(2), torch.zeros(2), "full")


def test_unknown_estimator_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match="k5.*allowed: k1, k2, k3, abs, full"):
        kl_per_token(torch.zeros(2), torch.zeros(2), "k5")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_estimators_are_finite_on_extreme_log_ratios(estimator, dtype):
    logp = torch.tensor([-1e4, 0.0, -80.0, -1e-30, -3e4], dtype=dtype)
    ref_logp = torch.tensor([0.0, -1e4, 0.0, -90.0, -1e-3], dtype=dtype)
    assert torch.isfinite(kl_per_token(logp, ref_logp, estimator)).all()


def test_k3_is_accurate_for_tiny_log_ratios():
    # exp(-l) - 1 + l ≈ l²/2 for small l; a naive form loses every digit at l = 1e-4 in float32
    l = torch.tensor([1e-4, -1e-4])
    got = kl_per_token(l, torch.zeros(2), "k3")
    torch.testing.assert_close(got, 0.5 * l**2, rtol=1e-3, atol=0)


def _sample_log_ratios(n: int, seed: int = 0):
    """n tokens sampled from p, with their log p and log q, and the exact KL(p‖q)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    x = torch.multinomial(p, n, replacement=True, generator=g)
    l_all = p.log() - q.log()
    exact_kl = float((p * l_all).sum())
    exact_k2 = float((p * 0.5 * l_all**2).sum())
    return p.log()[x], q.log()[x], exact_kl, exact_k2


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_on_categorical_samples(estimator):
    # 20,000 samples: the sample mean is within 4 standard errors of the exact KL with
    # probability 1 - 6e-5 (normal approximation; both estimators have finite variance here).
    logp, ref_logp, exact_kl, _ = _sample_log_ratios(20_000)
    values = kl_per_token(logp, ref_logp, estimator)
    standard_error = values.std() / math.sqrt(values.numel())
    assert abs(values.mean() - exact_kl) < 4 * standard_error


def test_k2_bias_is_the_predicted_one():
    # E_p[l²/2] differs from KL(p‖q) = E_p[l]; the sample mean of k2 must land within 4 standard
    # errors of E_p[l²/2], and the bias must be more than 4 standard errors from zero.
    logp, ref_logp, exact_kl, exact_k2 = _sample_log_ratios(20_000, seed=1)
    values = kl_per_token(logp, ref_logp, "k2")
    standard_error = values.std() / math.sqrt(values.numel())
    assert abs(values.mean() - exact_k2) < 4 * standard_error
    assert abs(exact_k2 - exact_kl) > 4 * standard_error


def test_k3_has_lower_variance_than_k1_when_the_distributions_are_close():
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.32, 0.28, 0.4], dtype=torch.float64)
    x = torch.multinomial(p, 10_000, replacement=True, generator=g)
    k1 = kl_per_token(p.log()[x], q.log()[x], "k1")
    k3 = kl_per_token(p.log()[x], q.log()[x], "k3")
    assert k3.var() < 0.1 * k1.var()


def test_straight_through_k2_gradient_keeps_the_value_of_the_estimator():
    logp = torch.tensor([-0.2, -1.5, -0.9], requires_grad=True)
    ref_logp = torch.tensor([-0.5, -1.0, -0.9])
    term = kl_penalty_per_token(logp, ref_logp, "k3", gradient="k2")
    torch.testing.assert_close(term, kl_per_token(logp, ref_logp, "k3").detach())
    term.sum().backward()
    torch.testing.assert_close(logp.grad, (logp - ref_logp).detach())  # d(l²/2)/dl = l


def test_kl_metrics_report_every_estimator_from_one_batch():
    logp = torch.tensor([[-0.2, -1.0, -5.0], [-0.4, -0.3, -0.1]])
    ref_logp = torch.tensor([[-0.5, -1.2, -0.1], [-0.4, -0.9, -0.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logits, ref_logits = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = kl_metrics(logp, ref_logp, mask, "k3", logits=logits, ref_logits=ref_logits)
    for name in ESTIMATORS:
        expected = masked_mean(kl_per_token(logp, ref_logp, name, logits=logits,
                                            ref_logits=ref_logits), mask)
        assert out[f"kl/{name}"] == pytest.approx(float(expected), rel=1e-6)
    assert out["kl/mean"] == out["kl/k3"]
    k3 = kl_per_token(logp, ref_logp, "k3")
    assert out["kl/seq"] == pytest.approx(float((k3 * mask).sum(1).mean()), rel=1e-6)


def test_full_kl_in_chunks_of_rows_equals_one_pass_with_its_gradient(monkeypatch):
    logits = torch.randn(5, 3, 7, requires_grad=True)
    ref_logits = torch.randn(5, 3, 7)
    whole = full_kl(logits, ref_logits)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    monkeypatch.setattr(estimators, "VOCAB_CHUNK_ELEMENTS", 2 * 3 * 7)  # rows of 2, 2 and 1
    chunked = full_kl(logits, ref_logits)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.equal(chunked, whole) and torch.equal(grad_chunked, grad_whole)
