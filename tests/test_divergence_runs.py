"""kl.divergence on the command line: bad input fails in one line before training, and an
exact-task run under another divergence logs the optimum of its own divergence and unit,
which exact.json alone reproduces."""

import json

import numpy as np
import pytest

from klsweep.config import compose_and_validate
from klsweep.exact_divergence import divergence, optimum
from klsweep.kl.divergences import make_divergence
from tests.conftest import assert_refused_in_one_line, run_and_read


@pytest.mark.parametrize("overrides,message", [
    (["kl.divergence=foo"], "kl.divergence must be one of reverse_kl, forward_kl, js, alpha, "
                            "chi2 (got 'foo')"),
    (["kl.divergence=alpha", "kl.alpha=1.5"], "kl.alpha must be a number > 0 and < 1 (got 1.5)"),
    (["kl.alpha=0"], "kl.alpha must be a number > 0 and < 1 (got 0)"),
    (["kl.divergence=chi2", "estimator=k2"],
     "kl.estimator=k2 cannot estimate kl.divergence=chi2 at kl.unit=token (allowed: k1, k3, "
     "full)"),
    (["kl.divergence=forward_kl", "kl.unit=sequence", "estimator=full"],
     "kl.estimator=full cannot estimate kl.divergence=forward_kl at kl.unit=sequence "
     "(allowed: k1, k3)"),
    (["kl.divergence=js", "kl.gradient=k2"],
     "kl.gradient=k2 is a reverse-KL option (kl.divergence=js allows: estimator)"),
    (["kl.divergence=alpha", "kl.is_correction=true"],  # GRPO: the KL in the loss
     "kl.is_correction=true is a reverse-KL option of a loss-placed KL (kl.divergence=alpha "
     "needs kl.is_correction=false, or auto)"),
])
def test_bad_divergence_settings_fail_in_one_line_before_anything_is_written(
        overrides, message, tmp_path, monkeypatch, capsys):
    assert_refused_in_one_line(overrides, message, tmp_path / "run", monkeypatch, capsys)


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "alpha", "chi2"])
def test_grpo_s_default_correction_lets_every_divergence_run_in_the_loss_as_typed(divergence):
    # kl.is_correction=auto is false for a divergence other than the KL: the documented
    # command `algo=grpo kl.divergence=chi2 kl.placement=loss` needs no third key
    cfg = compose_and_validate({"algo": "grpo", "kl.divergence": divergence,
                                "kl.placement": "loss"})
    assert cfg.kl.is_correction is False


SMALL_EXACT = ["task=exact", "task.vocab_size=3", "task.completion_len=3", "steps=4",
               "task.eval_every=2", "schedule=fixed", "kl.beta=0.2",
               "trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["algo=grpo", "kl.divergence=forward_kl", "kl.unit=sequence", "kl.placement=reward"],
    ["algo=ppo", "kl.divergence=js", "kl.unit=token", "kl.placement=loss", "estimator=full"],
])
def test_an_exact_run_is_scored_against_its_own_divergences_optimum(overrides, tmp_path):
    summary, rows = run_and_read(tmp_path, *SMALL_EXACT, *overrides)
    assert summary["status"] == "completed"
    settings = dict(o.split("=", 1) for o in overrides)
    div, unit = make_divergence(settings["kl.divergence"]), settings["kl.unit"]
    record = json.loads((tmp_path / "exact.json").read_text())
    assert record["divergence"]["name"] == div.name and record["divergence"]["unit"] == unit
    policy = np.array([p["policy_logp"] for p in record["prompts"]])
    ref = np.array([p["ref_logp"] for p in record["prompts"]])
    reward = np.array([p["reward"] for p in record["prompts"]])
    beta = record["beta_seq"]
    value = divergence(div, unit, policy, ref, 3).mean()
    _, j_star = optimum(div, unit, ref, reward, beta, 3)
    j_run = (np.exp(policy) * reward).sum(-1).mean() - beta * value
    gain = j_star.mean() - (np.exp(ref) * reward).sum(-1).mean()
    last = rows[-1]
    assert last["exact/divergence"] == pytest.approx(value, abs=1e-9)
    assert last["exact/optimal_objective"] == pytest.approx(j_star.mean(), abs=1e-9)
    assert last["exact/improvement_left"] == pytest.approx((j_star.mean() - j_run) / gain,
                                                           abs=1e-9)
    assert 0 < last["exact/improvement_left"] <= 1.0 + 1e-9
    # exact/kl stays the reverse KL, on one plane with every other run
    assert last["exact/kl"] == pytest.approx(
        (np.exp(policy) * (policy - ref)).sum(-1).mean(), abs=1e-9)
    # the schedule's figure is the divergence's own estimate
    assert "kl/divergence" in last and "kl/divergence_seq" in last
