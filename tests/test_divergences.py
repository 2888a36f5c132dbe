"""The f-divergences as pure functions of log u: f′ is f's derivative in u, (f′)⁻¹ inverts
f′ on its range and clips where the range demands, and each is the divergence it names."""

import math

import pytest
import torch

from klsweep.kl.divergences import DIVERGENCES, make_divergence

ALL = [make_divergence(name, 0.3 if name == "alpha" else None) for name in DIVERGENCES]
LOG_U = torch.linspace(-4.0, 3.0, 57, dtype=torch.float64)


@pytest.mark.parametrize("div", ALL, ids=repr)
def test_f_vanishes_at_one_and_f_prime_is_its_derivative_in_u(div):
    assert float(div.f(torch.zeros((), dtype=torch.float64))) == pytest.approx(0.0, abs=1e-15)
    u = LOG_U.exp().requires_grad_(True)
    (grad,) = torch.autograd.grad(div.f(u.log()).sum(), u)
    torch.testing.assert_close(grad, div.f_prime(LOG_U), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("div", ALL, ids=repr)
def test_f_prime_inverse_inverts_f_prime_on_its_range(div):
    torch.testing.assert_close(div.f_prime_inverse(div.f_prime(LOG_U)), LOG_U.exp(),
                               rtol=1e-10, atol=1e-12)
    beyond = torch.tensor([div.f_prime_sup + 1.0], dtype=torch.float64)
    if math.isfinite(div.f_prime_sup):
        assert torch.isinf(div.f_prime_inverse(beyond)).all()


def test_chi2_inverse_is_clipped_at_zero_below_f_prime_of_zero():
    chi2 = make_divergence("chi2")
    t = torch.tensor([-5.0, -2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(chi2.f_prime_inverse(t),
                               torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64))


def test_each_divergence_is_the_one_it_names_on_two_distributions():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    log_u = p.log() - q.log()

    def d(name, alpha=None):
        return float((q * make_divergence(name, alpha).f(log_u)).sum())

    m = 0.5 * (p + q)
    assert d("reverse_kl") == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    assert d("forward_kl") == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-12)
    assert d("chi2") == pytest.approx(float(((p - q) ** 2 / q).sum()), rel=1e-12)
    assert d("js") == pytest.approx(float((p * (p / m).log()).sum() + (q * (q / m).log()).sum()),
                                    rel=1e-12)
    # α → 1 approaches the reverse KL, α → 0 the forward KL
    assert d("alpha", 1 - 1e-6) == pytest.approx(d("reverse_kl"), rel=1e-5)
    assert d("alpha", 1e-6) == pytest.approx(d("forward_kl"), rel=1e-5)


def test_sampled_value_averages_to_the_divergence_under_the_policy():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    log_u = p.log() - q.log()
    for div in ALL:
        assert float((p * div.sampled_value(log_u)).sum()) == pytest.approx(
            float((q * div.f(log_u)).sum()), rel=1e-12)


@pytest.mark.parametrize("bad", ["foo", "alpha"])
def test_unknown_divergence_or_missing_alpha_fails(bad):
    with pytest.raises(ValueError):
        make_divergence(bad)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 2.0, math.nan])
def test_alpha_outside_the_open_unit_interval_fails(alpha):
    with pytest.raises(ValueError, match="alpha"):
        make_divergence("alpha", alpha)
