"""DPO: the sigmoid/robust/ipo/hinge losses on hand-computed values and against TRL's formulas,
the minimiser under
Bradley–Terry labels against the closed-form optimum π* ∝ π_ref·exp(r/β), the statistics of
the pair labels, and the real command end to end."""

from __future__ import annotations

import math

import pytest
import torch

from klsweep.algos.dpo import DPO, order_pairs
from klsweep.algos.dpo_losses import dpo_loss, sequence_logratio
from klsweep.config import ConfigError, choice_config, compose_and_validate
from klsweep.preferences import bradley_terry_labels, deterministic_labels
from tests.conftest import run_and_read


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(("loss_type", "smoothing", "expected"), [
    # h = 0.5 − (−0.5) = 1, β = 0.1
    ("sigmoid", 0.0, _softplus(-0.1)),                               # −log σ(0.1)
    ("sigmoid", 0.1, 0.9 * _softplus(-0.1) + 0.1 * _softplus(0.1)),  # conservative DPO
    ("ipo", 0.0, (1 - 5.0) ** 2),                                    # (h − 1/(2β))²
    ("ipo", 0.1, 0.9 * (1 - 5.0) ** 2 + 0.1 * (-1 - 5.0) ** 2),
    ("hinge", 0.0, 1 - 0.1),                                         # max(0, 1 − βh)
    ("hinge", 0.1, 0.9 * (1 - 0.1) + 0.1 * (1 + 0.1)),
    ("robust", 0.0, _softplus(-0.1)),                                # ε = 0: DPO
    ("robust", 0.1, (0.9 * _softplus(-0.1) - 0.1 * _softplus(0.1)) / 0.8),
])
def test_preference_losses_on_hand_computed_values(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(torch.tensor([0.5]), torch.tensor([-0.5]), 0.1,
                                        loss_type, smoothing)
    assert float(losses[0]) == pytest.approx(expected, rel=1e-6)
    assert float(chosen[0]) == pytest.approx(0.05) and float(rejected[0]) == pytest.approx(-0.05)


def test_hinge_loss_is_zero_past_the_margin():
    losses, _, _ = dpo_loss(torch.tensor([30.0]), torch.tensor([0.0]), 0.1, "hinge")
    assert float(losses[0]) == 0.0


def _trl_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta: float, loss_type: str, label_smoothing: float):
    """TRL's DPOTrainer.dpo_loss, written out: logits = (π_c − π_r) − (ref_c − ref_r) on the
    (already summed or normalised) completion log-probs; TRL reads ε only in sigmoid/robust."""
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - eps)
                  - torch.nn.functional.logsigmoid(-beta * logits) * eps)
    elif loss_type == "robust":
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - eps)
                  + torch.nn.functional.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo, eq. (17) of Azar et al., β as their τ
        losses = (logits - 1 / (2 * beta)) ** 2
    return (losses, beta * (chosen_logps - ref_chosen_logps),
            beta * (rejected_logps - ref_rejected_logps))


# three pairs of hand-made per-token log-probs; completions of 2 to 5 tokens, the padding
# after them (-9) must not count
_LOGP = {
    "chosen": [[-0.5, -1.2, -0.3, -2.0, -9.0], [-1.0, -0.1, -9.0, -9.0, -9.0],
               [-0.7, -0.7, -0.9, -0.2, -1.5]],
    "rejected": [[-2.2, -0.4, -9.0, -9.0, -9.0], [-0.3, -1.9, -0.8, -0.6, -9.0],
                 [-1.1, -2.5, -0.2, -0.4, -0.9]],
    "ref_chosen": [[-0.9, -1.0, -0.6, -1.7, -9.0], [-0.6, -0.8, -9.0, -9.0, -9.0],
                   [-1.0, -0.4, -1.2, -0.3, -1.6]],
    "ref_rejected": [[-1.5, -0.8, -9.0, -9.0, -9.0], [-0.9, -1.2, -0.7, -1.0, -9.0],
                     [-1.3, -1.8, -0.6, -0.2, -1.4]],
}
_LENGTHS = {"chosen": [4, 2, 5], "rejected": [2, 4, 5]}


@pytest.mark.parametrize(("loss_type", "smoothing", "per_token"), [
    ("sigmoid", 0.0, False),
    ("sigmoid", 0.2, False),   # cDPO
    ("robust", 0.0, False),
    ("robust", 0.2, False),
    ("hinge", 0.0, False),
    ("ipo", 0.0, False),       # klsweep's summed IPO: TRL's formula on summed log-probs
    ("ipo", 0.0, True),        # TRL's IPO: each completion's log-probs averaged per token
])
def test_losses_and_implicit_rewards_match_trl_formulas(loss_type, smoothing, per_token):
    beta = 0.3
    logp = {k: torch.tensor(v, dtype=torch.float64) for k, v in _LOGP.items()}
    mask = {k: torch.arange(5)[None, :] < torch.tensor(n)[:, None] for k, n in _LENGTHS.items()}
    logratio = {side: sequence_logratio(logp[side], logp[f"ref_{side}"], mask[side], per_token)
                for side in ("chosen", "rejected")}
    ours = dpo_loss(logratio["chosen"], logratio["rejected"], beta, loss_type, smoothing)
    # TRL: log-probs summed over the completion, divided by its length for ipo
    length = {k: torch.tensor(n, dtype=torch.float64) for k, n in _LENGTHS.items()}
    trl_logps = {k: (v * mask[k.removeprefix("ref_")]).sum(-1) for k, v in logp.items()}
    if per_token:
        trl_logps = {k: v / length[k.removeprefix("ref_")] for k, v in trl_logps.items()}
    trl = _trl_losses(trl_logps["chosen"], trl_logps["rejected"], trl_logps["ref_chosen"],
                      trl_logps["ref_rejected"], beta, loss_type, smoothing)
    for got, expected in zip(ours, trl, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
def test_sequence_logratio_takes_the_reference_per_token_or_as_cached_sums(per_token):
    logp = torch.tensor(_LOGP["chosen"], dtype=torch.float64)
    ref = torch.tensor(_LOGP["ref_chosen"], dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.tensor(_LENGTHS["chosen"])[:, None]
    from_tokens = sequence_logratio(logp, ref, mask, per_token)
    from_sums = sequence_logratio(logp, (ref * mask).sum(-1), mask, per_token)
    torch.testing.assert_close(from_tokens, from_sums, rtol=0, atol=1e-12)
    summed = [-4.0 + 4.2, -1.1 + 1.4, -4.0 + 4.5]  # Σ logp − Σ ref over each completion
    expected = [v / n for v, n in zip(summed, _LENGTHS["chosen"], strict=True)] if per_token \
        else summed
    assert from_tokens.tolist() == pytest.approx(expected, abs=1e-12)


def test_sequence_logratio_of_an_empty_completion_is_zero_per_token():
    empty = torch.zeros(1, 3, dtype=torch.bool)
    logp = torch.full((1, 3), -1.0)
    assert sequence_logratio(logp, torch.zeros(1), empty, per_token=True).tolist() == [0.0]


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_robust_loss_averaged_over_a_label_flip_is_the_clean_dpo_loss(eps):
    # Chowdhury et al. (2024): the loss is unbiased under flips with known rate ε
    h = torch.tensor([-30.0, -2.0, -0.3, 0.0, 0.7, 4.0, 30.0], dtype=torch.float64)
    zero = torch.zeros_like(h)
    as_labelled = dpo_loss(h, zero, BETA, "robust", eps)[0]
    flipped = dpo_loss(zero, h, BETA, "robust", eps)[0]
    clean = dpo_loss(h, zero, BETA, "sigmoid")[0]
    torch.testing.assert_close((1 - eps) * as_labelled + eps * flipped, clean,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_robust_loss_rejects_a_flip_rate_outside_zero_to_one_half(eps):
    with pytest.raises(ValueError, match="robust loss needs 0 <= label_smoothing < 0.5"):
        dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), 0.1, "robust", eps)


def test_unknown_loss_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: sigmoid, robust, ipo, hinge"):
        dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), 0.1, "kto")


# A two-completion toy: one prompt, completions y1 and y2, the policy π(y1) = σ(θ).
REF_P1, R1, R2, BETA = 0.3, 0.8, 0.2, 0.25


def _logratios(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp1, logp2 = torch.nn.functional.logsigmoid(theta), torch.nn.functional.logsigmoid(-theta)
    return logp1 - math.log(REF_P1), logp2 - math.log(1 - REF_P1)


def _minimise(objective) -> float:
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(theta.detach())


def _expected_loss(theta, loss_type: str, smoothing: float = 0.0) -> torch.Tensor:
    """The population DPO loss over pairs (y1, y2) with Bradley–Terry labels: y1 is chosen
    with probability σ(r1 − r2). (Pairs of one completion twice have h = 0 for every θ and
    add a constant.)"""
    l1, l2 = _logratios(theta)
    p1 = 1.0 / (1.0 + math.exp(-(R1 - R2)))
    y1_chosen, _, _ = dpo_loss(l1[None], l2[None], BETA, loss_type, smoothing)
    y2_chosen, _, _ = dpo_loss(l2[None], l1[None], BETA, loss_type, smoothing)
    return (p1 * y1_chosen + (1 - p1) * y2_chosen).sum()


def _closed_form_theta() -> float:
    """π*(y) ∝ π_ref(y)·exp(r(y)/β), as a logit of π*(y1)."""
    return math.log(REF_P1 / (1 - REF_P1)) + (R1 - R2) / BETA


def test_dpo_minimiser_under_bradley_terry_labels_is_the_regularised_optimum():
    theta = _minimise(lambda t: _expected_loss(t, "sigmoid"))
    assert theta == pytest.approx(_closed_form_theta(), abs=1e-6)


def test_label_smoothing_moves_the_minimiser_to_the_smoothed_preference():
    # with labels flipped w.p. ε the optimum has σ(β·h*) = (1−ε)·p + ε·(1−p)
    eps = 0.1
    p1 = 1.0 / (1.0 + math.exp(-(R1 - R2)))
    p_smooth = (1 - eps) * p1 + eps * (1 - p1)
    theta = _minimise(lambda t: _expected_loss(t, "sigmoid", eps))
    h = math.log(p_smooth / (1 - p_smooth)) / BETA
    assert theta == pytest.approx(math.log(REF_P1 / (1 - REF_P1)) + h, abs=1e-6)


def test_robust_minimiser_under_flipped_labels_is_the_clean_regularised_optimum():
    # labels flipped w.p. ε: y1 wins w.p. (1−ε)·p + ε·(1−p). cDPO's minimiser moves to that
    # noisy preference (above); the robust loss, told ε, recovers π* ∝ π_ref·exp(r/β)
    eps = 0.2
    p1 = 1.0 / (1.0 + math.exp(-(R1 - R2)))
    p_noisy = (1 - eps) * p1 + eps * (1 - p1)

    def noisy_expected_loss(theta):
        l1, l2 = _logratios(theta)
        y1_chosen = dpo_loss(l1[None], l2[None], BETA, "robust", eps)[0]
        y2_chosen = dpo_loss(l2[None], l1[None], BETA, "robust", eps)[0]
        return (p_noisy * y1_chosen + (1 - p_noisy) * y2_chosen).sum()

    theta = _minimise(noisy_expected_loss)
    assert theta == pytest.approx(_closed_form_theta(), abs=1e-6)


def test_ipo_minimiser_is_its_own_regularised_target_not_dpo_s():
    # IPO regresses h onto (2p − 1)/(2β) (Azar et al. 2023): a different optimum than DPO's
    p1 = 1.0 / (1.0 + math.exp(-(R1 - R2)))
    theta = _minimise(lambda t: _expected_loss(t, "ipo"))
    expected = math.log(REF_P1 / (1 - REF_P1)) + (2 * p1 - 1) / (2 * BETA)
    assert theta == pytest.approx(expected, abs=1e-6)


def test_dpo_minimiser_on_sampled_bradley_terry_labels_is_within_sampling_error():
    # The empirical minimiser solves σ(β·h) = p̂, p̂ the share of pairs where y1 won, so
    # θ̂ − θ* = (logit p̂ − logit p)/β; by the delta method its sd is 1/(β·sqrt(n·p(1−p))).
    # 4 sd: a correct implementation fails with probability < 1e-4.
    n = 20000
    generator = torch.Generator().manual_seed(0)
    y1_wins = bradley_terry_labels(torch.full((n,), R1, dtype=torch.float64),
                                   torch.full((n,), R2, dtype=torch.float64), generator)
    p1 = 1.0 / (1.0 + math.exp(-(R1 - R2)))
    tolerance = 4.0 / (BETA * math.sqrt(n * p1 * (1 - p1)))

    def empirical_loss(theta):
        l1, l2 = _logratios(theta)
        chosen = torch.where(y1_wins, l1, l2)
        rejected = torch.where(y1_wins, l2, l1)
        return dpo_loss(chosen, rejected, BETA)[0].mean()

    theta = _minimise(empirical_loss)
    assert abs(theta - _closed_form_theta()) < tolerance
    p_hat = float(y1_wins.double().mean())
    assert theta == pytest.approx(math.log(REF_P1 / (1 - REF_P1))
                                  + math.log(p_hat / (1 - p_hat)) / BETA, abs=1e-5)


@pytest.mark.parametrize("gap", [-2.0, -0.5, 0.0, 0.3, 1.0, 3.0])
def test_bradley_terry_label_frequency_is_sigmoid_of_the_reward_gap(gap):
    # 4 binomial standard deviations of the observed share: fails w.p. < 1e-4 if correct
    n = 40000
    generator = torch.Generator().manual_seed(1)
    wins = bradley_terry_labels(torch.full((n,), gap), torch.zeros(n), generator)
    p = 1.0 / (1.0 + math.exp(-gap))
    assert abs(float(wins.float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_deterministic_labels_prefer_the_higher_reward_and_break_ties_fairly():
    n = 40000
    generator = torch.Generator().manual_seed(2)
    a = torch.tensor([0.9, 0.1, 0.5])
    b = torch.tensor([0.1, 0.9, 0.4])
    assert deterministic_labels(a, b, generator).tolist() == [True, False, True]
    ties = deterministic_labels(torch.full((n,), 0.5), torch.full((n,), 0.5), generator)
    assert abs(float(ties.float().mean()) - 0.5) < 4 * math.sqrt(0.25 / n)


def test_order_pairs_puts_the_chosen_row_first():
    order = order_pairs(torch.tensor([True, False, True]))
    assert order.tolist() == [0, 1, 3, 2, 4, 5]


@pytest.mark.parametrize(("ties", "kept"), [("keep", [1, 0, 2, 3, 4, 5]),
                                            ("drop", [1, 0, 4, 5])])
def test_dropping_ties_keeps_only_pairs_the_reward_orders(ties, kept):
    # a 0/1 verifier's pairs (rows 2i, 2i+1): wrong/right, right/right (a tie), right/wrong;
    # ordered chosen first
    dpo = DPO(choice_config("algo", "dpo", labels="deterministic", ties=ties))
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    order = torch.tensor([1, 0, 2, 3, 4, 5])
    assert dpo._kept_rows(order, rewards).tolist() == kept


def test_dpo_rejects_a_kl_placement_before_training():
    with pytest.raises(ConfigError, match="kl.placement must be none for algo=dpo"):
        compose_and_validate({"algo": "dpo", "kl.placement": "loss"})
    with pytest.raises(ConfigError, match="kl.beta must be > 0 for algo=dpo"):
        compose_and_validate({"algo": "dpo", "kl.beta": "0"})


@pytest.mark.slow
def test_offline_dpo_command_measures_kl_every_eval_every_steps(tmp_path):
    # a data set smaller than a batch: the batches wrap around it, one fresh order per epoch
    summary, rows = run_and_read(tmp_path, "algo=dpo", "steps=3", "algo.eval_every=2",
                         "algo.dataset_pairs=24", "algo.pairs_per_step=40")
    assert summary["status"] == "completed" and summary["algo"] == "dpo"
    assert [row["dpo/pairs"] for row in rows] == [40.0, 40.0, 40.0]
    assert [row["dpo/fresh_eval"] for row in rows] == [1.0, 0.0, 1.0]
    assert [row["perf/samples"] > 0 for row in rows] == [True, False, True]
    assert rows[1]["kl/mean"] == rows[0]["kl/mean"]  # carried, and marked so
    for key in ("dpo/margin", "dpo/accuracy", "dpo/chosen_reward", "dpo/rejected_reward",
                "kl/mean", "kl/seq", "reward/mean", "kl/beta"):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-5)  # π starts as π_ref
    assert rows[2]["kl/k3"] > 0


@pytest.mark.slow
def test_online_dpo_command_measures_kl_on_its_own_pairs_every_step(tmp_path):
    summary, rows = run_and_read(tmp_path, "algo=dpo", "steps=2", "algo.online=true",
                         "algo.loss=ipo", "algo.pairs_per_step=8")
    assert summary["status"] == "completed"
    assert [row["perf/samples"] for row in rows] == [16.0, 16.0]
    assert rows[1]["kl/k3"] > 0
