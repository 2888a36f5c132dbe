"""Shared fixtures: every command runs in a temporary run dir with W&B offline."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The smallest run that still exercises every part: 2 prompts × 2 completions, 4 steps.
TINY = ["steps=4", "algo.prompts_per_step=2", "algo.group_size=2", "checkpoint.every=2",
        "trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from one random state, whichever tests its worker ran before it
    (the suite runs modules on several workers, in an order that changes from run to run)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_klsweep(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command, as a user types it."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "klsweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_and_read(run_dir: Path, *overrides: str) -> tuple[dict, list[dict]]:
    """Run the real command into ``run_dir`` without an experiment logger; return its
    summary.json and metrics.jsonl rows."""
    result = run_klsweep(*overrides, "logger=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows
