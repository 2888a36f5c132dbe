"""The over-optimisation part of the report: Gao et al.'s fit and its peak on curves of known
α, β, and the figure and text it writes for proxy runs built by hand."""

import json
import math

import numpy as np
import pytest
import yaml

from klsweep.report import main
from klsweep.report.overoptimization import (
    fit_gao,
    gao_curve,
    gao_peak,
    markdown_lines,
    peak_label,
    proxy_groups,
)
from klsweep.report.runs import load_run

ALPHA, BETA = 0.5, 0.2  # d* = exp(0.5/0.2 − 1) = e^1.5 ≈ 4.48, KL* = e³ ≈ 20.1


def test_the_fit_recovers_alpha_and_beta_of_a_noiseless_curve():
    kl = np.linspace(0.05, 30.0, 40)
    alpha, beta = fit_gao(kl, gao_curve(np.sqrt(kl), ALPHA, BETA))
    assert (alpha, beta) == (pytest.approx(ALPHA, abs=1e-10), pytest.approx(BETA, abs=1e-10))


def test_the_fit_recovers_alpha_and_beta_within_the_noise_of_noisy_points():
    rng = np.random.default_rng(0)
    kl = rng.uniform(0.01, 40.0, 400)
    sigma = 0.05
    gain = gao_curve(np.sqrt(kl), ALPHA, BETA) + rng.normal(0, sigma, kl.size)
    alpha, beta = fit_gao(kl, gain)
    # least-squares standard errors: σ²·(XᵀX)⁻¹ with X = [d, −d·log d]; 4 of them
    d = np.sqrt(kl)
    features = np.stack([d, -d * np.log(d)], axis=1)
    se = sigma * np.sqrt(np.diag(np.linalg.inv(features.T @ features)))
    assert abs(alpha - ALPHA) < 4 * se[0] and abs(beta - BETA) < 4 * se[1]


def test_points_at_zero_kl_are_ignored_and_too_few_points_give_nan():
    kl = [0.0, 1.0, 4.0]
    gain = [0.3, float(gao_curve(1.0, ALPHA, BETA)), float(gao_curve(2.0, ALPHA, BETA))]
    assert fit_gao(kl, gain) == (pytest.approx(ALPHA), pytest.approx(BETA))
    assert all(math.isnan(v) for v in fit_gao([0.0, 2.0, 2.0], [0.0, 1.0, 1.0]))


def test_the_peak_is_at_exp_alpha_over_beta_minus_one_where_the_curve_is_largest():
    d_star, peak = gao_peak(ALPHA, BETA)
    assert d_star == pytest.approx(math.exp(ALPHA / BETA - 1))
    assert d_star**2 == pytest.approx(math.exp(2 * ALPHA / BETA - 2))  # KL*
    grid = np.linspace(1e-6, 20.0, 2_000_001)
    values = gao_curve(grid, ALPHA, BETA)
    assert grid[values.argmax()] == pytest.approx(d_star, abs=1e-5)
    assert peak == pytest.approx(values.max()) == pytest.approx(BETA * d_star)
    # β ≤ 0: no turn, the curve rises for ever (or never rises)
    assert gao_peak(0.5, -0.1) == (math.inf, math.inf)
    assert gao_peak(-0.5, 0.0) == (0.0, 0.0)


def _proxy_run(path, *, beta, pairs, kl, gold, proxy, task="exact", reference=(0.4, 1.0)):
    """A run dir of a proxy run: exact rows (exact/kl, exact/gold_reward, exact/proxy_reward)
    on the exact task, sampled rows (kl/seq, reward/gold, reward/proxy) otherwise; gold and
    proxy are gains over ``reference`` (gold, proxy)."""
    (path / ".hydra").mkdir(parents=True)
    cfg = {"seed": 0, "kl": {"beta": beta, "target": 0.05, "unit": "token",
                             "schedule": {"name": "fixed"}},
           "algo": {"name": "grpo"},
           "task": {"name": task, "completion_len": 4, "reward_source": "proxy",
                    "proxy": {"pairs": pairs}}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    gold0, proxy0 = reference
    with (path / "metrics.jsonl").open("w") as f:
        for step, (k, g, p) in enumerate(zip(kl, gold, proxy, strict=True)):
            row = {"step": step, "kl/mean": k / 4, "kl/beta": beta, "reward/mean": p + proxy0}
            if task == "exact":
                row |= {"exact/kl": k, "exact/reward": p + proxy0,
                        "exact/gold_reward": g + gold0, "exact/proxy_reward": p + proxy0}
            else:
                row |= {"kl/seq": k, "reward/gold": g + gold0, "reward/proxy": p + proxy0}
            f.write(json.dumps(row) + "\n")
    (path / "summary.json").write_text(json.dumps({"status": "completed", "algo": "grpo",
                                                   "task": task, "schedule": "fixed"}))


def _sweep(root, task="exact", points=12):
    """Two proxies (pairs 256 and 1024), three β each; every run follows the curve of known
    α, β up to its own final KL: β = 0.1 stops at KL 4, 0.03 at 16, 0.01 at 36. The proxy
    gain rises linearly in √KL."""
    stops = {0.1: 4.0, 0.03: 16.0, 0.01: 36.0}
    for i, (pairs, alpha) in enumerate(((256, ALPHA), (1024, 2 * ALPHA))):
        for j, (beta, last) in enumerate(stops.items()):
            kl = np.linspace(0.0, last, points)
            d = np.sqrt(kl)
            _proxy_run(root / f"{3 * i + j}", beta=beta, pairs=pairs, kl=kl.tolist(),
                       gold=gao_curve(d, alpha, BETA).tolist(), proxy=(0.3 * d).tolist(),
                       task=task)


def test_runs_are_grouped_by_proxy_and_the_run_stopping_nearest_the_peak_is_named(tmp_path):
    _sweep(tmp_path)
    runs = [load_run(tmp_path / str(i)) for i in range(6)]
    for run in runs:
        run.record["group"] = f"fixed · kl.beta={run.get('kl.beta')}"
    groups = proxy_groups(runs)
    assert [g.pairs for g in groups] == [256, 1024]
    small, large = groups
    assert (small.alpha, small.beta) == (pytest.approx(ALPHA), pytest.approx(BETA))
    assert small.kl_star == pytest.approx(math.exp(2 * ALPHA / BETA - 2))  # ≈ 20.1
    # the closest final √KL to d* ≈ 4.48: √16 = 4 (β = 0.03), not √36 = 6 nor √4 = 2
    assert small.closest.label == "fixed · kl.beta=0.03"
    assert [t.order[0] for t in small.trajectories] == [0.01, 0.03, 0.1]
    # twice α: KL* = e^(2·5 − 2), far beyond the KL reached
    assert large.kl_star == pytest.approx(math.exp(8)) and large.kl_star > large.max_kl


def test_a_peak_past_the_measured_kl_is_not_printed_as_a_kl_star(tmp_path):
    _sweep(tmp_path)
    small, large = proxy_groups([load_run(tmp_path / str(i)) for i in range(6)])
    assert peak_label(small) == "KL* = 20.1 nats/sequence"
    # the fit's own peak, e^8 ≈ 2981, lies far past the 36 nats the runs reached
    assert peak_label(large) == "rising through KL = 36 nats/sequence"
    text = "\n".join(markdown_lines([small, large]))
    assert "2.98e+03" not in text and "| rising through KL = 36 nats/sequence |" in text


def test_the_report_writes_the_figure_and_prints_the_fit_per_proxy(tmp_path, caplog):
    _sweep(tmp_path)
    with caplog.at_level("INFO", logger="klsweep"):
        assert main([str(tmp_path)]) == 0
    assert (tmp_path / "overoptimization.png").is_file()
    text = (tmp_path / "report.md").read_text()
    assert "## Over-optimisation: gold against proxy reward" in text
    assert "![Over-optimisation: gold and proxy reward against √KL](overoptimization.png)" in text
    assert ("task.proxy.pairs=256: α = 0.5, β = 0.2; gold reward peaks at KL* = 20.1 "
            "nats/sequence (√KL = 4.48)") in text
    assert ("task.proxy.pairs=1024: α = 1, β = 0.2; the fitted gold reward still rises at the "
            "largest KL reached (36 nats/sequence): no peak within it") in text
    assert "**fixed · kl.beta=0.03** stopped nearest it, at KL 16" in text
    printed = caplog.text
    assert "over-optimisation: grpo · exact, task.proxy.pairs=256: α = 0.5, β = 0.2" in printed


def test_sampled_runs_are_fitted_on_trailing_means_from_their_first_step(tmp_path):
    _sweep(tmp_path, task="digits", points=200)
    runs = [load_run(tmp_path / str(i)) for i in range(6)]
    groups = proxy_groups(runs)
    # the first step is the reference (gain 0 at KL 0); a 10-step trailing mean over 200
    # steps bends the curve a little, so the fit is close to, not exactly, α and β
    first = groups[0].trajectories[0]
    assert first.kl[0] == 0 and first.gold[0] == 0
    assert groups[0].alpha == pytest.approx(ALPHA, rel=0.05)
    assert groups[0].beta == pytest.approx(BETA, rel=0.05)


def test_no_proxy_runs_no_section(tmp_path):
    _proxy_run(tmp_path / "0", beta=0.1, pairs=256, kl=[0.5, 1.0], gold=[0.1, 0.2],
               proxy=[0.1, 0.2])
    config = tmp_path / "0" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("reward_source: proxy", "reward_source: gold"))
    assert main([str(tmp_path)]) == 0
    assert "Over-optimisation" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "overoptimization.png").exists()


def test_the_preset_composes_an_exact_proxy_sweep_over_beta_and_pairs():
    from klsweep.config import compose_and_validate

    cfg = compose_and_validate({"sweep": "overoptimization", "task": "exact"})
    assert (cfg.task.name, cfg.task.reward_source, cfg.kl.schedule.name) == (
        "exact", "proxy", "fixed")
    assert (cfg.kl.placement, cfg.kl.estimator) == ("reward", "k1")
    from klsweep.config import CONF_DIR

    preset = yaml.safe_load((CONF_DIR / "sweep" / "overoptimization.yaml").read_text())
    assert set(preset["hydra"]["sweeper"]["params"]) == {"kl.beta", "task.proxy.pairs"}


@pytest.mark.slow
def test_the_real_sweep_and_report_write_the_fit_and_the_figure(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "WANDB_MODE": "offline", "KLSWEEP_CACHE": str(tmp_path / "cache")}
    sweep = tmp_path / "sweep"
    subprocess.run(
        [sys.executable, "-m", "klsweep", "-m", "sweep=overoptimization", "task=exact",
         "steps=10", "logger=none", "trainer.enable_progress_bar=false",
         "algo.prompts_per_step=2", "algo.group_size=4", "task.proxy.steps=10",
         "task.reference_steps=10", "hydra.sweeper.n_trials=4",
         "hydra.sweeper.params={kl.beta:'choice(0.01,0.1)',task.proxy.pairs:'choice(64,128)'}",
         f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, check=True, capture_output=True,
        text=True, timeout=600)
    result = subprocess.run([sys.executable, "-m", "klsweep.report", str(sweep)], cwd=REPO,
                            env=env, check=True, capture_output=True, text=True, timeout=300)
    assert (sweep / "overoptimization.png").is_file()
    assert result.stderr.count("klsweep.report: over-optimisation: grpo · exact") == 2
    exact = json.loads((sweep / "0" / "exact.json").read_text())
    assert exact["reward_source"] == "proxy" and "gold_reward" in exact["best_of_n"]
