"""What a researcher sees of a sweep, from the real command: each run named and tagged by its
swept values in W&B (read back with W&B's own reader), and a console with one line per trial
event and the study's progress instead of the runs' progress bars."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a grid of 4 trials: 2 divergences × 2 values of kl.max, one of which every run passes at its
# first step with a KL above 0, so that two trials fail with their reason; β, which the preset
# sweeps, fixed by a plain value
SEARCH = ["kl.divergence=choice(reverse_kl,chi2)", "kl.max=choice(1000,1e-9)", "kl.beta=0.1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    """The sweep dir and the console (stdout and stderr) of a tiny sweep=divergences, with
    W&B offline and the progress bar at its default (on)."""
    root = tmp_path_factory.mktemp("shown")
    sweep_dir = root / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "KLSWEEP_CACHE": str(root / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "klsweep", "-m", "sweep=divergences", *SEARCH, "steps=3",
         "algo.prompts_per_step=2", "algo.group_size=2", "task.reference_steps=10",
         "logger=wandb", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result.stdout + result.stderr


def trials(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def wandb_run_record(run_dir: Path) -> dict:
    """The run record of the offline W&B run in ``run_dir``, as ``wandb leet inspect`` reads
    it back."""
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    output = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                             str(wandb_dir)], capture_output=True, text=True, check=True).stdout
    (run,) = [record["run"] for record in map(json.loads, output.splitlines())
              if record["type"] == "run"]
    return run


@pytest.mark.slow
def test_each_run_is_named_and_tagged_in_w_and_b_by_its_swept_values(sweep):
    sweep_dir, _ = sweep
    rows = trials(sweep_dir)
    assert len(rows) == 4
    names = set()
    for row in rows:
        run = wandb_run_record(Path(row["run_dir"]))
        divergence, max_kl = row["kl.divergence"], f"{float(row['kl.max']):.4g}"
        assert run["display_name"] == f"grpo-k1-fixed-s0 divergence={divergence} max={max_kl}"
        assert {"grpo", "k1", "fixed", "exact", f"kl.divergence={divergence}",
                f"kl.max={max_kl}"} <= set(run["tags"])
        assert run["run_group"] == "sweep"
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["name"] == run["display_name"]
        names.add(run["display_name"])
    assert len(names) == 4


@pytest.mark.slow
def test_the_console_shows_one_line_per_trial_event_and_the_study_s_progress(sweep):
    sweep_dir, console = sweep
    lines = console.splitlines()
    for row in trials(sweep_dir):
        values = f"divergence={row['kl.divergence']} max={float(row['kl.max']):.4g}"
        started = [line for line in lines if f"klsweep: trial {row['number']} started" in line]
        ended = [line for line in lines if re.search(
            rf"klsweep: trial {row['number']} (COMPLETE|FAIL|PRUNED) ", line)]
        assert len(started) == len(ended) == 1, console
        assert started[0].endswith(f"started · {values}")
        if row["kl.max"] == "1000":  # its objectives
            assert re.search(r"COMPLETE · exact/reward_final=\S+ exact/kl_final=\S+ · "
                             + re.escape(values) + "$", ended[0])
        else:  # why it failed
            assert re.search(r"FAIL · KL \S+ \(sequence\) exceeded kl.max=1e-09 at step 1 · "
                             + re.escape(values) + "$", ended[0])
    progress = [line for line in lines if "klsweep: study divergences: " in line
                and " trials done · " in line]
    assert len(progress) == 4  # one after each trial's end
    # a grid's failed point is done (the grid sampler does not draw it again)
    assert "4 of 4 trials done · 2 COMPLETE, 2 FAIL · 0 running · " in progress[-1]
    # no run's progress bar, no run's own summary line, no launcher's list of overrides
    assert "step 1/3" not in console and "█" not in console
    assert "completed after" not in console and "trial.storage=" not in console
