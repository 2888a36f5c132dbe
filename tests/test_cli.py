"""The command line: bad input fails before training in one line; a tiny run writes its
whole record, W&B included."""

import json
import subprocess
import sys

import pytest
import torch

from klsweep.__main__ import main
from tests.conftest import TINY, assert_refused_in_one_line, run_klsweep


@pytest.mark.parametrize("override,message", [
    ("schedule=sigmoid", "schedule=sigmoid is not a known choice (allowed: adaptive, cosine, "
                         "dual, exponential, fixed, linear, multiplicative, pid)"),
    ("estimator=k5", "estimator=k5 is not a known choice (allowed: abs, full, k1, k2, k3)"),
    ("kl.beta=-0.1", "kl.beta must be a number >= 0 (got -0.1)"),
    ("kl.beta=abc", "kl.beta must be a number >= 0 (got 'abc')"),
    ("kl.target=0", "kl.target must be > 0 for schedule=adaptive (got 0)"),
    ("steps=0", "steps must be an integer >= 1 (got 0)"),
    ("algo.group_size=1", "algo.group_size must be an integer >= 2 (got 1)"),
    ("kl.placement=value", "kl.placement must be one of reward, loss, none (got 'value')"),
    ("kl.bta=0.1", "kl.bta is not a known key (allowed under kl: beta, target"),
    ("optim.lr=fast", "optim.lr must be a number > 0 (got 'fast')"),
    ("kl.is_correction=yes", "kl.is_correction must be one of auto, true, false (got 'yes')"),
])
def test_bad_input_fails_in_one_line_before_anything_is_written(
        override, message, tmp_path, monkeypatch, capsys):
    assert_refused_in_one_line([override], message, tmp_path / "run", monkeypatch, capsys)


# the correction on a term that already follows the per-position reverse KL: k2's own
# gradient, or k2's gradient through kl.gradient=k2 (two corrections of one term)
@pytest.mark.parametrize("overrides,form", [
    (["estimator=k2"], "kl.estimator=k2 kl.is_correction=true"),
    (["kl.gradient=k2"], "kl.estimator=k3 kl.gradient=k2 kl.is_correction=true"),
    (["algo=ppo", "kl.placement=loss", "estimator=k1", "kl.gradient=k2"],
     "kl.estimator=k1 kl.gradient=k2 kl.is_correction=true"),
])
def test_a_correction_that_breaks_a_kl_gradient_fails_in_one_line_naming_what_to_type(
        overrides, form, tmp_path, monkeypatch, capsys):
    message = (f"{form} in the loss follows no KL's gradient (without the correction it follows "
               f"reverse_kl_myopic: the audit's table, klsweep.kl.forms); type "
               f"kl.is_correction=false, or auto for the audit's choice")
    assert_refused_in_one_line([*overrides, "kl.is_correction=true"], message, tmp_path / "run",
                               monkeypatch, capsys)


def test_a_bad_value_in_a_grid_fails_before_the_first_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["klsweep", "-m", "kl.beta=0.1,-1",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(SystemExit):
        main()
    assert "kl.beta must be a number >= 0 (got -1)" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_the_real_command_rejects_bad_input_without_a_traceback(tmp_path):
    result = run_klsweep("kl.target=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == ("klsweep: error: kl.target must be > 0 for "
                                     "schedule=adaptive (got 0)")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_tiny_run_writes_its_record_and_wandb_history(tmp_path):
    run_dir = tmp_path / "run"
    result = run_klsweep(*TINY, "steps=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "klsweep: grpo-k3-adaptive-s0 completed after 3/3 steps" in result.stdout
    assert (run_dir / ".hydra" / "config.yaml").exists()
    # the last checkpoint holds the β schedule's state after the last step, for an exact resume
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["klsweep"]["step_count"] == 3
    assert checkpoint["klsweep"]["schedule"]["steps_done"] == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    required = ("kl/mean kl/k1 kl/k2 kl/k3 kl/seq kl/beta kl/target reward/mean reward/std "
                "policy/entropy policy/clipfrac loss/total perf/tokens_per_s perf/step_s").split()
    for row in rows:
        assert set(required) <= set(row)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    last_quarter = rows[-1]  # 3 steps: the last quarter is the last step
    assert summary["kl/final"] == pytest.approx(last_quarter["kl/mean"])
    assert summary["reward/final"] == pytest.approx(last_quarter["reward/mean"])

    # W&B's own reader gives back the KL trajectory the run logged
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    # the interpreter that runs the tests: a venv that is not activated has no wandb on PATH
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                              str(wandb_run)],
                             capture_output=True, text=True, check=True).stdout
    history = [json.loads(line)["history"] for line in records.splitlines()
               if '"type":"history"' in line]
    logged = [h["item"] for h in history if "kl/mean" in h["item"]]
    assert [row["kl/mean"] for row in logged] == pytest.approx([r["kl/mean"] for r in rows])
    assert [row["kl/beta"] for row in logged] == pytest.approx([r["kl/beta"] for r in rows])


@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo"])
def test_help_lists_every_option_with_the_help_line_its_dataclass_declares(algo, monkeypatch,
                                                                           capsys):
    from dataclasses import fields

    from klsweep.config import compose_and_validate, node_schemas

    monkeypatch.setattr(sys, "argv", ["klsweep", f"algo={algo}", "--help"])
    main()
    out = capsys.readouterr().out
    for node, schema in node_schemas(compose_and_validate({"algo": algo})):
        for f in fields(schema):
            assert f.metadata.get("help"), f"{schema.__name__}.{f.name} has no help line"
            key = f"{node}.{f.name}" if node else f.name
            line = next(line for line in out.splitlines() if line.strip().startswith(key + "="))
            assert f.metadata["help"] in line
