"""A run's own record replays: from metrics.jsonl, .hydra/config.yaml and exact.json alone, the
β schedule reproduces every logged β, and the sampled KL estimates agree with the exact KL
within their standard errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from klsweep.config import build_schedule
from tests.conftest import run_and_read

STEPS = 30
# One prompt: the 64 completions of a step are then i.i.d. draws from π(·|x), and exact/kl is
# that prompt's KL (with several prompts, a step's 8 prompts would add their own spread).
# kl.is_correction=false: the replay's tolerances were set before GRPO took TRL's default
# (docs/research/gradient-audit.md)
RUN = ["task=exact", "task.n_prompts=1", "task.eval_every=1", "algo=grpo", "schedule=adaptive",
       "kl.is_correction=false",
       "kl.target=0.05", f"steps={STEPS}", "trainer.enable_progress_bar=false"]
TOLERANCE = 4.0  # standard errors


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("replay")
    summary, rows = run_and_read(run_dir, *RUN)
    assert summary["status"] == "completed" and [r["step"] for r in rows] == list(range(STEPS))
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return cfg, rows, json.loads((run_dir / "exact.json").read_text())


@pytest.mark.slow
def test_the_schedule_rebuilt_from_the_config_reproduces_every_logged_beta(record):
    cfg, rows, _ = record
    schedule = build_schedule(cfg.kl)
    measured = "kl/mean" if cfg.kl.unit == "token" else "kl/seq"
    for row in rows:
        # kl/beta is the β the step used; the schedule then moves it with the step's KL
        assert row["kl/beta"] == pytest.approx(schedule.beta, rel=1e-9), row["step"]
        schedule.update(row[measured], int(row["perf/samples"]))
    betas = [row["kl/beta"] for row in rows]
    assert max(betas) > 1.05 * min(betas)  # β really moved, so the replay tested something


def _token_logprobs(sequence_logp: np.ndarray, V: int, L: int) -> np.ndarray:
    """log π(y_t | x, y_<t) [V^L, L] of every completion (lexicographic order), from the
    table of its sequence log-probs [V^L]: prefix marginals by logsumexp over the rest."""
    marginals = [sequence_logp.reshape((V,) * L)]  # marginals[k]: log π(y_1..y_k)
    for _ in range(L):
        marginals.insert(0, np.logaddexp.reduce(marginals[0], axis=-1))
    columns = []
    for k in range(1, L + 1):
        conditional = marginals[k] - marginals[k - 1][..., None]
        columns.append(np.broadcast_to(conditional.reshape(conditional.shape + (1,) * (L - k)),
                                       (V,) * L).reshape(-1))
    return np.stack(columns, axis=1)


def _sequence_estimator_spread(exact: dict) -> dict[str, float]:
    """The exact standard deviation, under π, of the per-sequence k1 and k3 estimators
    Σ_t k(l_t), from exact.json's tables."""
    V, L = exact["task"]["vocab_size"], exact["task"]["completion_len"]
    (prompt,) = exact["prompts"]
    logp, ref_logp = np.array(prompt["policy_logp"]), np.array(prompt["ref_logp"])
    log_ratio = _token_logprobs(logp, V, L) - _token_logprobs(ref_logp, V, L)  # l_t
    np.testing.assert_allclose(log_ratio.sum(1), logp - ref_logp, atol=1e-9)
    prob = np.exp(logp)
    spread = {}
    for name, per_sequence in (("k1", log_ratio.sum(1)),
                               ("k3", (np.expm1(-log_ratio) + log_ratio).sum(1))):
        mean = prob @ per_sequence
        spread[name] = math.sqrt(prob @ (per_sequence - mean) ** 2)
    return spread


@pytest.mark.slow
def test_sampled_kl_estimates_agree_with_the_exact_kl_within_their_standard_errors(record):
    """exact/kl at step s is KL(π‖π_ref) per *sequence* of the policy after update s; the
    samples of step s+1 come from that very policy, and kl/k1, kl/k3 are their means per
    token: × L (every completion has exactly L tokens) they estimate exact/kl without bias
    (k3 by the chain rule: each token's E[k3] is that position's KL).

    Their standard errors need a per-sequence spread, and only means are logged, so:
    * k1, every step: Cauchy–Schwarz, (Σ_t l_t)² ≤ L·Σ_t l_t², bounds E[S1²] by 2L²·kl/k2
      (kl/k2 = mean of l²/2 per token, from the same batch), so SE ≤ √(2L²·kl/k2 / n);
      checked per step and pooled over all steps (independent batches).
    * k1 and k3, last comparison: the exact spread of each sequence estimator, from the
      final tables in exact.json. Those are one update past the policy that sampled the last
      row; the test checks that this update moved exact/kl by under 5 %.

    The check catches arguments swapped where the KL is measured (PolicyPair.measure or
    kl_metrics given (ref_logp, logp)); tried on this run: k1 flips sign, so each step is off
    by 2·exact/kl (17 of 29 steps fail, the pooled z-score is ≈ −27, the last step's ≈ −18);
    k3 becomes E_π[e^l − 1 − l] = χ²(π‖π_ref) − KL, ≈ 20 standard errors above the exact KL
    at the last step. (A wrong k3 in training as well bends the policy until χ² − KL is near
    the KL, ~3 standard errors here: the hand-computed estimators of test_policy_pair.py
    catch that one.)"""
    cfg, rows, exact = record
    L = cfg.task.completion_len
    assert all(row["policy/length"] == L for row in rows)

    residuals, variances = [], []
    for before, row in zip(rows[:-1], rows[1:], strict=True):
        n = row["perf/samples"]
        d = L * row["kl/k1"] - before["exact/kl"]
        se = math.sqrt(2 * L**2 * row["kl/k2"] / n)
        assert abs(d) <= TOLERANCE * se, (row["step"], d, se)
        residuals.append(d)
        variances.append(se**2)
    assert abs(sum(residuals)) <= TOLERANCE * math.sqrt(sum(variances))

    before, last = rows[-2], rows[-1]
    assert abs(rows[-1]["exact/kl"] - before["exact/kl"]) < 0.05 * before["exact/kl"]
    assert exact["step"] == STEPS - 1 and exact["temperature"] == cfg.rollout.temperature
    spread = _sequence_estimator_spread(exact)
    n = last["perf/samples"]
    for name in ("k1", "k3"):
        se = spread[name] / math.sqrt(n)
        d = L * last[f"kl/{name}"] - before["exact/kl"]
        assert abs(d) <= TOLERANCE * se, (name, d, se)
