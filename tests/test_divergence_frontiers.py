"""Each divergence's frontier in the report: its points against closed forms (the reverse KL's
tilted optimum, χ²'s unclipped optimum), its shape, the reverse-KL frontier above every other
divergence's on the reward–KL plane, and the real sweep preset and report end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from klsweep.config import compose_and_validate
from klsweep.exact_math import expected_reward, frontier_reward, sequence_kl, tilted_logp
from klsweep.kl.divergences import make_divergence
from klsweep.report.frontiers import divergence_frontier, frontier_betas
from tests.conftest import REPO

# two prompts over six completions: a reference far from uniform and a reward with ties
REF_LOGP = np.log(np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05],
                            [0.05, 0.10, 0.15, 0.20, 0.22, 0.28]]))
REWARD = np.array([[0.0, 0.2, 0.2, 0.5, 0.9, 1.0],
                   [1.0, 0.7, 0.4, 0.4, 0.1, 0.0]])


def test_the_reverse_kl_frontier_is_the_tilted_optimum():
    betas = [0.05, 0.2, 1.0, 5.0]
    curve = divergence_frontier(make_divergence("reverse_kl"), "sequence", REF_LOGP, REWARD,
                                betas, vocab_size=6)
    for i, beta in enumerate(betas):
        tilted = tilted_logp(REF_LOGP, REWARD, 1.0 / beta)
        assert curve.reward[i] == pytest.approx(expected_reward(tilted, REWARD).mean(), abs=1e-9)
        assert curve.kl[i] == pytest.approx(sequence_kl(tilted, REF_LOGP).mean(), abs=1e-9)
        assert curve.divergence[i] == pytest.approx(curve.kl[i], abs=1e-9)


def test_the_chi2_frontier_at_large_beta_is_its_unclipped_closed_form():
    # π* = π_ref·(1 + (r − E_ref r)/(2β)) while no completion is dropped (β ≥ (E r − min r)/2):
    # E_π*[r] = E_ref[r] + Var_ref(r)/(2β), χ²(π*‖π_ref) = Var_ref(r)/(4β²)
    p = np.exp(REF_LOGP)
    mean = (p * REWARD).sum(-1)
    var = (p * (REWARD - mean[:, None]) ** 2).sum(-1)
    betas = [0.5, 1.0, 3.0]
    curve = divergence_frontier(make_divergence("chi2"), "sequence", REF_LOGP, REWARD, betas,
                                vocab_size=6)
    for i, beta in enumerate(betas):
        assert curve.reward[i] == pytest.approx((mean + var / (2 * beta)).mean(), abs=1e-9)
        assert curve.divergence[i] == pytest.approx((var / (4 * beta**2)).mean(), abs=1e-9)


@pytest.mark.parametrize(("name", "alpha"), [("forward_kl", None), ("js", None),
                                             ("alpha", 0.5), ("chi2", None)])
def test_a_frontier_gains_reward_and_divergence_as_beta_falls_and_stays_under_the_kl_one(
        name, alpha):
    betas = frontier_betas(REWARD)[::-1]  # β falling
    curve = divergence_frontier(make_divergence(name, alpha), "sequence", REF_LOGP, REWARD,
                                betas, vocab_size=6)
    assert np.all(np.diff(curve.reward) >= -1e-9)
    assert np.all(np.diff(curve.divergence) >= -1e-9)
    # at its own reverse KL, no policy beats the reverse-KL optimum's reward
    for kl, reward in zip(curve.kl, curve.reward, strict=True):
        assert reward <= frontier_reward(REF_LOGP, REWARD, float(kl)) + 1e-6


def test_the_frontier_betas_scale_with_the_reward():
    assert np.allclose(frontier_betas(10 * REWARD), 10 * frontier_betas(REWARD))


def test_the_preset_sweeps_every_divergence_and_beta_on_the_exact_task():
    cfg = compose_and_validate({"sweep": "divergences"})
    assert (cfg.task.name, cfg.kl.schedule.name, cfg.kl.unit) == ("exact", "fixed", "sequence")
    params = cfg.hydra.sweeper.params if "hydra" in cfg else None
    assert params is None or set(params) == {"kl.divergence", "kl.beta"}
    compose_and_validate({"sweep": "divergences", "algo": "dpo", "kl.placement": "none"})


@pytest.mark.slow
def test_the_real_sweep_and_report_draw_each_divergence_s_frontier(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "KLSWEEP_CACHE": str(tmp_path / "cache")}
    sweep = tmp_path / "sweep"
    subprocess.run(
        [sys.executable, "-m", "klsweep", "-m", "sweep=divergences", "algo=dpo",
         "kl.placement=none", "algo.online=true", "algo.pairs_per_step=4", "steps=3", "logger=none",
         "trainer.enable_progress_bar=false", "task.reference_steps=10",
         "hydra.sweeper.n_trials=2",
         "hydra.sweeper.params={kl.divergence:'choice(reverse_kl,js)',kl.beta:'choice(0.3)'}",
         f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, check=True, capture_output=True,
        text=True, timeout=600)
    subprocess.run([sys.executable, "-m", "klsweep.report", str(sweep)], cwd=REPO, env=env,
                   check=True, capture_output=True, text=True, timeout=300)
    assert (sweep / "divergence_frontiers.png").is_file()
    assert "divergence_frontiers.png" in (sweep / "report.md").read_text()
