"""f-DPO (Wang et al. 2023): the loss −log σ(β·[f′(u_w) − f′(u_l)]) for each divergence, against
TRL's DPOTrainer formulas (``f_divergence_type``) on identical tensors; its minimiser under
Bradley–Terry labels against the closed-form optimum of the divergence-regularised objective;
the losses it refuses, before training."""

from __future__ import annotations

import pytest
import torch

from klsweep.algos.dpo_losses import dpo_loss, sequence_logratio
from klsweep.config import ConfigError, compose_and_validate
from klsweep.exact_divergence import sequence_optimum
from klsweep.kl.divergences import DIVERGENCES, make_divergence
from tests.test_dpo import _LENGTHS, _LOGP

DIVERGENCE_SETTINGS = [("reverse_kl", None), ("forward_kl", None), ("js", None),
                       ("alpha", 0.5), ("alpha", 0.2), ("chi2", None)]


def _trl_scores(logratio: torch.Tensor, divergence: str, alpha: float | None) -> torch.Tensor:
    """TRL's DPOTrainer per-completion score, f′(u) less a constant: reverse_kl log u,
    forward_kl −1/u (its f′ 1 − 1/u), js_divergence logsigmoid(log u) (log(2u/(1+u)) less
    log 2), alpha_divergence u^{α−1}/(α−1). TRL has no χ²: its f′ is 2(u − 1) (χPO's χ² part)."""
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return -torch.exp(-logratio)
    if divergence == "js":
        return torch.nn.functional.logsigmoid(logratio)
    if divergence == "alpha":
        return torch.exp((alpha - 1) * logratio) / (alpha - 1)
    return 2 * torch.expm1(logratio)


def _trl_f_dpo_losses(chosen_logratio, rejected_logratio, beta, loss_type, eps, divergence,
                      alpha):
    """TRL's losses on delta_score = chosen score − rejected score, implicit rewards on the
    log-ratios whatever the divergence."""
    delta = (_trl_scores(chosen_logratio, divergence, alpha)
             - _trl_scores(rejected_logratio, divergence, alpha))
    clean = -torch.nn.functional.logsigmoid(beta * delta)
    flipped = -torch.nn.functional.logsigmoid(-beta * delta)
    if loss_type == "sigmoid":
        losses = (1 - eps) * clean + eps * flipped
    else:  # robust
        losses = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
    return losses, beta * chosen_logratio, beta * rejected_logratio


@pytest.mark.parametrize(("divergence", "alpha"), DIVERGENCE_SETTINGS)
@pytest.mark.parametrize(("loss_type", "smoothing"),
                         [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2)])
def test_f_dpo_losses_match_trl_formulas(divergence, alpha, loss_type, smoothing):
    beta = 0.3
    logp = {k: torch.tensor(v, dtype=torch.float64) for k, v in _LOGP.items()}
    mask = {k: torch.arange(5)[None, :] < torch.tensor(n)[:, None] for k, n in _LENGTHS.items()}
    chosen, rejected = (sequence_logratio(logp[side], logp[f"ref_{side}"], mask[side])
                        for side in ("chosen", "rejected"))
    ours = dpo_loss(chosen, rejected, beta, loss_type, smoothing,
                    make_divergence(divergence, alpha))
    trl = _trl_f_dpo_losses(chosen, rejected, beta, loss_type, smoothing, divergence, alpha)
    for got, expected in zip(ours, trl, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("divergence", "alpha"), DIVERGENCE_SETTINGS)
def test_pair_score_is_f_prime_up_to_a_constant(divergence, alpha):
    div = make_divergence(divergence, alpha)
    log_u = torch.linspace(-6.0, 3.0, 37, dtype=torch.float64)
    offset = div.pair_score(log_u) - div.f_prime(log_u)
    torch.testing.assert_close(offset, offset[:1].expand_as(offset), rtol=0, atol=1e-12)


def test_reverse_kl_f_dpo_is_dpo_to_the_bit():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(2, 1000, generator=generator) * 5
    f_dpo = dpo_loss(chosen, rejected, 0.1, "sigmoid", 0.1, make_divergence("reverse_kl"))[0]
    dpo = (0.9 * -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected))
           + 0.1 * -torch.nn.functional.logsigmoid(-0.1 * (chosen - rejected)))
    assert torch.equal(f_dpo, dpo)


# a three-completion toy: one prompt, π = softmax(θ) with θ_0 = 0, Bradley–Terry labels on
# every pair of distinct completions drawn from π_ref
REF = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
REWARD = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)
BETA = 0.4


def _population_f_dpo_loss(theta2: torch.Tensor, divergence) -> torch.Tensor:
    logp = torch.log_softmax(torch.cat([torch.zeros(1, dtype=theta2.dtype), theta2]), 0)
    log_u = logp - REF.log()
    total = torch.zeros((), dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            if a != b:
                p_a_wins = torch.sigmoid(REWARD[a] - REWARD[b])
                loss = dpo_loss(log_u[a:a + 1], log_u[b:b + 1], BETA, divergence=divergence)[0]
                total = total + REF[a] * REF[b] * p_a_wins * loss.sum()
    return total


@pytest.mark.parametrize(("divergence", "alpha"), DIVERGENCE_SETTINGS[:-1])
def test_f_dpo_minimiser_under_bradley_terry_labels_is_the_divergence_s_optimum(divergence,
                                                                                alpha):
    # π* = π_ref·(f′)⁻¹((r − λ)/β) keeps every completion for these divergences (χ² may drop
    # one, which softmax only approaches), so the population loss's minimiser is π* itself
    div = make_divergence(divergence, alpha)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-13,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = _population_f_dpo_loss(theta, div)
        loss.backward()
        return loss

    optimizer.step(closure)
    learned = torch.softmax(torch.cat([torch.zeros(1, dtype=torch.float64), theta.detach()]), 0)
    best_logp, _ = sequence_optimum(div, REF.log()[None].numpy(), REWARD[None].numpy(), BETA)
    assert learned.tolist() == pytest.approx(torch.from_numpy(best_logp[0]).exp().tolist(),
                                             abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_ipo_and_hinge_have_no_f_dpo_form(loss_type):
    with pytest.raises(ValueError, match=f"the {loss_type} loss has no f-DPO form"):
        dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), 0.1, loss_type,
                 divergence=make_divergence("js"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"algo.loss": "ipo", "kl.divergence": "js", "kl.unit": "sequence"},
     "algo.loss=ipo: the ipo loss has no f-DPO form: with divergence 'js' use one of "
     "sigmoid, robust"),
    ({"algo.loss": "hinge", "kl.divergence": "chi2", "kl.unit": "sequence"},
     "the hinge loss has no f-DPO form"),
    ({"kl.divergence": "forward_kl"},
     "kl.unit must be sequence for algo=dpo with kl.divergence=forward_kl"),
])
def test_f_dpo_refuses_what_it_cannot_mean_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        compose_and_validate({"algo": "dpo", **overrides})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("loss", ["sigmoid", "robust"])
def test_every_divergence_composes_with_dpo_s_bradley_terry_losses(divergence, loss):
    compose_and_validate({"algo": "dpo", "algo.loss": loss, "kl.divergence": divergence,
                          "kl.unit": "sequence"})
