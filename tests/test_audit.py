"""The KL-gradient audit (python -m klsweep.audit): by enumeration on a small exact task, the
identities of Tang & Munos (2025) and DESIGN §13 hold for training's own KL code, and the
Monte Carlo estimates agree with the enumerated ones within their stated standard errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from klsweep.audit.config import check, compose_audit
from klsweep.audit.run import audit
from klsweep.config import compose_and_validate
from klsweep.kl import forms
from klsweep.report import main as report_main
from klsweep.schema import ConfigError
from klsweep.train import build_module
from tests.conftest import REPO
from tests.test_report import write_run

# 2 prompts × 3³ completions and a 1-layer model: every expectation is a sum of 54 terms
SMALL = ["task=exact", "task.vocab_size=3", "task.completion_len=3", "task.n_prompts=2",
         "task.reference_steps=60", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
         "logger=none", "audit.train_steps=15", "audit.samples=512", "audit.groups=16"]
EXACT = 1e-5  # float32 rounding of a sum that is 0 by algebra, as a share of |g*|
TABLE = 1e-6  # the same, for the table's claims (measured here: at most 4.6e-7)
Z = 4.0       # standard errors: a false alarm about once in 16,000 comparisons


def rows_of(*overrides: str) -> dict:
    cfg = compose_audit([*SMALL, *overrides])
    result = audit(cfg, check(cfg))
    return {(r["estimator"], r["placement"], r["gradient"], r["is_correction"], r["unit"],
             r["target"]): r for r in result["rows"]}


@pytest.fixture(scope="module")
def every_form():
    return rows_of("audit.refused=true")


@pytest.fixture(scope="module")
def enumerated(every_form):
    """The rows of the forms training accepts: the audit's default."""
    return {key: r for key, r in every_form.items() if r["accepted"]}


def row(rows, estimator, placement, target, gradient="estimator", correction=False,
        unit="token"):
    return rows[(estimator, placement, gradient, correction, unit, target)]


def test_k1_in_the_reward_is_the_exact_sequence_kl_gradient(enumerated):
    r = row(enumerated, "k1", "reward", "reverse_kl")
    assert r["rel_bias"] < EXACT and r["cosine"] == pytest.approx(1.0, abs=EXACT)


def test_k1_in_the_loss_has_zero_expected_gradient_on_policy(enumerated):
    for target in ("reverse_kl", "reverse_kl_myopic", "forward_kl"):
        r = row(enumerated, "k1", "loss", target)
        assert r["rel_bias"] == pytest.approx(1.0, abs=EXACT) and r["cosine"] == 0.0


def test_k2_in_the_loss_follows_the_per_position_reverse_kl(enumerated):
    r = row(enumerated, "k2", "loss", "reverse_kl_myopic")
    assert r["rel_bias"] < EXACT
    # and not the sequence's: the per-token loss drops how a token moves the later ones
    assert row(enumerated, "k2", "loss", "reverse_kl")["rel_bias"] > 100 * EXACT


def test_k3_in_the_loss_follows_the_forward_kl_per_position(enumerated):
    assert row(enumerated, "k3", "loss", "forward_kl")["rel_bias"] < EXACT
    assert row(enumerated, "k3", "loss", "reverse_kl_myopic")["rel_bias"] > 100 * EXACT


def test_k3_with_the_importance_correction_is_k2_in_the_loss(enumerated):
    for target in ("reverse_kl", "reverse_kl_myopic", "forward_kl"):
        corrected = row(enumerated, "k3", "loss", target, correction=True)
        k2 = row(enumerated, "k2", "loss", target)
        assert corrected["rel_bias"] == pytest.approx(k2["rel_bias"], abs=EXACT)
        assert corrected["cosine"] == pytest.approx(k2["cosine"], abs=EXACT)


def test_every_combination_training_accepts_has_a_row_per_target(enumerated):
    # reward: 5 estimators; loss: 5 × (kl.gradient, kl.is_correction) in (estimator, false),
    # (estimator, true), (k2, false), and (k2, true) on full only, less k2 with the
    # correction (training refuses both double corrections); × 2 units × 3 targets
    assert len(enumerated) == (5 + 15) * 2 * 3
    assert not any(c and (g == "k2" or e == "k2") and e != "full"
                   for (e, p, g, c, _, _) in enumerated)
    token, sequence = (row(enumerated, "k3", "loss", "forward_kl", unit=u) for u in
                       ("token", "sequence"))
    assert token["rel_bias"] == sequence["rel_bias"]
    assert token["variance"] == pytest.approx(sequence["variance"] / 3 ** 2)  # length 3


def test_the_table_of_forms_is_what_the_audit_measures_for_every_form(every_form):
    # the one table that the config check, kl.is_correction=auto and the audit read
    # (klsweep.kl.forms): each form follows its entry's target exactly, by enumeration, and an
    # entry of none is far from every target; refused forms are measured too
    assert {(r["estimator"], r["placement"], r["gradient"], r["is_correction"])
            for r in every_form.values()} == {
        (f.estimator, f.placement, f.gradient, f.is_correction) for f in forms.FOLLOWS}
    for key, r in every_form.items():
        if r["follows"] == r["target"]:
            assert r["rel_bias"] <= TABLE and r["cosine"] == pytest.approx(1.0, abs=TABLE), key
        elif r["follows"] == "none":
            assert r["rel_bias"] > 100 * EXACT, key
    assert {r["accepted"] for r in every_form.values()} == {True, False}


@pytest.mark.parametrize("estimator, corrected", [
    ("k1", True), ("k2", False), ("k3", True), ("abs", False), ("full", False)])
def test_grpo_s_default_correction_is_the_table_s_choice_and_follows_the_reverse_kl(
        every_form, estimator, corrected):
    cfg = compose_and_validate({"algo": "grpo", "task": "exact", "estimator": estimator,
                                "schedule": "fixed", "kl.beta": "0.1"})
    assert cfg.kl.is_correction is corrected  # what --help and W&B show
    assert build_module(cfg).pair.kl.is_correction is corrected  # what trains
    if estimator == "abs":  # neither form of abs follows a KL (the table)
        return
    r = row(every_form, estimator, "loss", "reverse_kl_myopic", correction=corrected)
    assert r["rel_bias"] <= TABLE


def test_monte_carlo_agrees_with_enumeration_within_its_standard_errors(enumerated):
    # the same trained policy (same seeds), every expectation from 512 draws in 16 groups;
    # the jackknife's errors shrink as 1/√N, and Z of them bound each difference
    sampled = rows_of("audit.method=monte_carlo")
    checked = 0
    for key, exact in enumerated.items():
        mc = sampled[key]
        if exact["cosine"] == 0.0:  # E ĝ = 0: the sampled mean's direction is noise
            continue
        assert abs(mc["rel_bias"] - exact["rel_bias"]) <= Z * mc["rel_bias_se"] + EXACT, key
        assert abs(mc["cosine"] - exact["cosine"]) <= Z * mc["cosine_se"] + EXACT, key
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("override, message", [
    ("audit.targets=[nope]", "audit.targets must be one of"),
    ("audit.samples=0", "audit.samples must be an integer >= 1 (got 0)"),
    ("audit.staleness=-1", "audit.staleness must be an integer >= 0 (got -1)"),
])
def test_bad_input_fails_in_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_audit(["task=exact", override])
    result = subprocess.run([sys.executable, "-m", "klsweep.audit", "task=exact", override],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_the_command_writes_the_table_the_figure_and_a_wandb_table_and_the_report_takes_them(
        tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    audit_dir = tmp_path / "audit"
    args = [a for a in SMALL if a != "logger=none"] + [
        "audit.staleness=2", "audit.samples=64", "audit.groups=4", f"hydra.run.dir={audit_dir}"]
    result = subprocess.run([sys.executable, "-m", "klsweep.audit", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((audit_dir / "audit.json").read_text())
    assert record["staleness"] == 2 and record["method"] == "enumeration"
    assert (audit_dir / "audit.png").stat().st_size > 0
    table = (audit_dir / "audit.md").read_text()
    assert ("| k3 | loss | estimator | true | token | reverse_kl_myopic | true | forward_kl |"
            in table)
    assert list(audit_dir.glob("wandb/offline-run-*/files/media/table/audit_*.table.json"))

    # beside a sweep's runs, the schedule report copies the table into its folder, shows
    # rel_bias per way of forming the term, and logs the rows as a W&B table
    write_run(tmp_path / "runs" / "0", schedule="fixed", seed=0, kl=[0.01] * 50,
              beta=[0.1] * 50, reward=[0.5] * 50)
    assert report_main([str(tmp_path), "--wandb"]) == 0
    assert (tmp_path / "audit.md").read_text() == table
    assert (tmp_path / "audit.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    k3_loss = next(r for r in record["rows"] if (r["estimator"], r["placement"], r["gradient"],
                                                 r["is_correction"], r["unit"], r["target"])
                   == ("k3", "loss", "estimator", False, "token", "forward_kl"))
    assert "## KL-gradient audit" in report and "staleness 2" in report
    assert re.search(r"\| k3 in the loss \| [^|]+ \| [^|]+ \| "
                     + re.escape(f"{k3_loss['rel_bias']:.3g}") + r" \|", report)
    logged = next(tmp_path.glob("wandb/offline-run-*/files/media/table/report/"
                                "audit_table_*.table.json"))
    assert len(json.loads(logged.read_text())["data"]) == len(record["rows"])
