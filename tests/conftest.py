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


def assert_refused_in_one_line(overrides: list[str], message: str, run_dir: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m klsweep OVERRIDES`` exits with status 2 and one line naming ``message``,
    before it writes anything into ``run_dir``."""
    from klsweep.__main__ import main

    monkeypatch.setattr(sys, "argv", ["klsweep", *overrides, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("klsweep: error: ")
    assert message in err
    assert not run_dir.exists()
