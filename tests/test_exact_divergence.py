"""The exact optimum of each f-divergence-regularised objective, sequence and token unit,
checked against a numerical optimiser on the simplex (L-BFGS over logits; projected gradient
where χ² puts zero mass) to 1e-6, and against the KL's closed form."""

import numpy as np
import pytest
import torch

from klsweep.exact_divergence import (
    divergence,
    sequence_optimum,
    token_divergence,
    token_optimum,
)
from klsweep.exact_math import optimal_logp, optimal_objective
from klsweep.kl.divergences import DIVERGENCES, make_divergence

ALL = [make_divergence(name, 0.4 if name == "alpha" else None) for name in DIVERGENCES]
V, L, X = 3, 2, 2
BETA = 0.5


def _tables(seed=0):
    """A reference over the V^L completions of X prompts and a reward in [0, 1]."""
    rng = np.random.default_rng(seed)
    ref_logits = rng.normal(size=(X, V**L))
    ref_logp = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
    return ref_logp, rng.uniform(size=(X, V**L))


def _lbfgs(objective, params, steps=200):
    """Maximise ``objective()`` over ``params`` with L-BFGS to the last digits."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -objective()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return float(objective().detach())


def _sequence_objective(div, logp, ref_logp, reward, beta):
    return (logp.exp() * reward).sum(-1) - beta * (ref_logp.exp() * div.f(logp - ref_logp)).sum(-1)


@pytest.mark.parametrize("div", ALL, ids=repr)
def test_sequence_optimum_matches_lbfgs_over_logits(div):
    ref_logp, reward = _tables()
    beta = 2.0 if div.name == "chi2" else BETA  # χ² at 2.0 drops nothing: an interior optimum
    best, j_star = sequence_optimum(div, ref_logp, reward, beta)
    ref, r = torch.from_numpy(ref_logp), torch.from_numpy(reward)
    logits = ref.clone().requires_grad_(True)
    j_num = _lbfgs(lambda: _sequence_objective(div, torch.log_softmax(logits, -1), ref, r,
                                               beta).sum(), [logits])
    assert np.exp(best).min() > 0
    assert j_star.sum() == pytest.approx(j_num, abs=1e-6)
    np.testing.assert_allclose(np.exp(best), torch.softmax(logits, -1).detach().numpy(),
                               atol=1e-6)
    # J* is the objective of π*
    value = _sequence_objective(div, torch.from_numpy(best), ref, r, beta)
    np.testing.assert_allclose(value.numpy(), j_star, atol=1e-12)


def _project_to_simplex(v):
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008)."""
    s = -np.sort(-v, axis=-1)
    cumulative = np.cumsum(s, axis=-1) - 1.0
    index = np.arange(1, v.shape[-1] + 1)
    rho = (s - cumulative / index > 0).sum(-1, keepdims=True)
    theta = np.take_along_axis(cumulative, rho - 1, axis=-1) / rho
    return np.maximum(v - theta, 0.0)


def test_chi2_optimum_drops_low_rewards_and_matches_projected_gradient():
    chi2 = make_divergence("chi2")
    ref_logp, reward = _tables(1)
    beta = 0.1
    best, j_star = sequence_optimum(chi2, ref_logp, reward, beta)
    assert (np.exp(best) == 0).any()  # the clip at zero is at work
    q = np.exp(ref_logp)
    p = q.copy()
    step = q.min() / (2 * beta)  # 1 / Lipschitz constant of the gradient r − 2β(p/q − 1)
    for _ in range(20000):
        p = _project_to_simplex(p + step * (reward - 2 * beta * (p / q - 1)))
    j_num = (p * reward).sum(-1) - beta * (q * (p / q - 1) ** 2).sum(-1)
    np.testing.assert_allclose(j_star, j_num, atol=1e-6)
    np.testing.assert_allclose(np.exp(best), p, atol=1e-6)


def _token_objective(div, z0, z1, ref_logp, reward, beta):
    """J of the policy whose first-token logits are z0 [X, V] and second-token logits z1
    [X, V, V], with the token-unit divergence written out for L = 2."""
    ref = ref_logp.reshape(X, V, V)
    ref0 = torch.logsumexp(ref, -1)
    ref1 = ref - ref0[..., None]
    p0, p1 = torch.log_softmax(z0, -1), torch.log_softmax(z1, -1)
    logp = (p0[..., None] + p1).reshape(X, V * V)

    def d(p, q):
        return (q.exp() * div.f(p - q)).sum(-1)

    reg = d(p0, ref0) + (p0.exp() * d(p1, ref1)).sum(-1)
    return ((logp.exp() * reward).sum(-1) - beta * reg).sum()


@pytest.mark.parametrize("div", ALL, ids=repr)
def test_token_optimum_by_backward_induction_matches_lbfgs_over_every_prefix(div):
    ref_logp, reward = _tables(2)
    beta = 2.0 if div.name == "chi2" else BETA
    best, j_star = token_optimum(div, ref_logp, reward, beta, V)
    ref, r = torch.from_numpy(ref_logp), torch.from_numpy(reward)
    z0 = torch.zeros(X, V, dtype=torch.float64, requires_grad=True)
    z1 = torch.zeros(X, V, V, dtype=torch.float64, requires_grad=True)
    j_num = _lbfgs(lambda: _token_objective(div, z0, z1, ref, r, beta), [z0, z1])
    assert j_star.sum() == pytest.approx(j_num, abs=1e-6)
    num_logp = (torch.log_softmax(z0, -1)[..., None] + torch.log_softmax(z1, -1)).reshape(X, -1)
    np.testing.assert_allclose(np.exp(best), num_logp.exp().detach().numpy(), atol=1e-6)
    # J* is the token-unit objective of π*, as token_divergence measures it
    j_best = (np.exp(best) * reward).sum(-1) - beta * token_divergence(div, best, ref_logp, V)
    np.testing.assert_allclose(j_best, j_star, atol=1e-10)


def test_for_the_kl_both_units_are_the_closed_form_optimum():
    kl = make_divergence("reverse_kl")
    ref_logp, reward = _tables(3)
    closed = optimal_logp(ref_logp, reward, BETA)
    for unit_optimum in (sequence_optimum(kl, ref_logp, reward, BETA),
                         token_optimum(kl, ref_logp, reward, BETA, V)):
        np.testing.assert_allclose(unit_optimum[0], closed, atol=1e-10)
        assert unit_optimum[1].mean() == pytest.approx(optimal_objective(ref_logp, reward, BETA),
                                                       abs=1e-10)
    policy = optimal_logp(ref_logp, reward, 2.0)
    np.testing.assert_allclose(divergence(kl, "token", policy, ref_logp, V),
                               divergence(kl, "sequence", policy, ref_logp, V), atol=1e-12)


def test_forward_kl_token_unit_is_not_the_sequence_forward_kl():
    fkl = make_divergence("forward_kl")
    ref_logp, reward = _tables(4)
    policy = optimal_logp(ref_logp, reward, 0.3)
    gap = divergence(fkl, "token", policy, ref_logp, V) - divergence(fkl, "sequence", policy,
                                                                     ref_logp, V)
    assert np.abs(gap).max() > 1e-3
