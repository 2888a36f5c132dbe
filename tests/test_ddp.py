"""Data-parallel runs agree: with two CPU ranks (gloo), each samples its own prompts, the
step's metrics and the KL that steers β are reduced across ranks, every rank applies the same
β, and rank 0 alone writes the record and prints."""

from __future__ import annotations

import json

import pytest

from klsweep.records import read_metrics
from tests.conftest import TINY, run_klsweep

DDP_ON_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.precision=32-true"]


@pytest.mark.slow
def test_two_cpu_ranks_hold_the_same_beta_at_every_step_and_write_one_record(tmp_path):
    run_dir = tmp_path / "run"
    result = run_klsweep(*TINY, "steps=6", "logger=none", *DDP_ON_CPU, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    # both ranks print here: one summary line, rank 0's
    [line] = [line for line in result.stdout.splitlines() if line.startswith("klsweep:")]
    assert "completed after 6/6 steps" in line
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(6))
    for row in rows:
        assert row["dist/world_size"] == 2
        # max minus min over the ranks of the β each applied at this step, from both ranks
        assert row["dist/beta_spread"] == 0
        assert row["perf/samples"] == 2 * 2 * 2  # ranks × prompts × completions
    # the ranks measured different rewards: each sampled its own prompts and completions
    assert any(row["dist/reward_spread"] > 0 for row in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 6
    assert summary["kl/beta_final"] == rows[-1]["kl/beta"]
