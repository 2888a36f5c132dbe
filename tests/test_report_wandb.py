"""The W&B layout, read back from real offline runs: group, job type, tags, run name, the
step axis, and the final and tracking metrics in each run's summary; and the report's own
run of job_type=report in the same group."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from klsweep.report import main
from klsweep.tracking import TRACKING_KEYS


def inspect(run_dir: Path, *flags: str) -> str:
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *flags,
                             str(run_dir)], check=True, capture_output=True, text=True)
    return result.stdout


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in inspect(run_dir, "--json").splitlines() if line]


def wandb_run_dir(root: Path) -> Path:
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return run_dir


@pytest.mark.slow
def test_offline_runs_and_report_are_laid_out_for_comparison(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    sweep_run = subprocess.run(
        [sys.executable, "-m", "klsweep", "-m", "schedule=fixed,adaptive", "seed=0,1",
         "steps=5", "logger=wandb", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=os.environ | {"WANDB_MODE": "offline"}, capture_output=True,
        text=True, timeout=600)
    assert sweep_run.returncode == 0, sweep_run.stderr[-3000:]
    names = set()
    for job in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()):
        local = json.loads((job / "summary.json").read_text())
        run_dir = wandb_run_dir(job)
        state = json.loads(inspect(run_dir, "--summary", "--json"))
        expected_name = f"grpo-k3-{local['schedule']}-s{local['seed']}"
        assert state["name"] == local["name"] == expected_name
        names.add(state["name"])
        assert {"k3", local["schedule"]} <= set(state["tags"])
        # the swept values, as tags: the default name shows these two already
        assert {f"schedule={local['schedule']}", f"seed={local['seed']}"} <= set(state["tags"])
        (run,) = [r["run"] for r in records(run_dir) if r["type"] == "run"]
        assert run["run_group"] == local["group"] == "sweep"
        assert run["job_type"] == "grpo"
        summary = state["summary"]
        for key in ("reward/final", "kl/final", "kl/beta_final", *TRACKING_KEYS):
            assert key in local
            # W&B stores a NaN (never settled) as null
            expected = None if local[key] != local[key] else pytest.approx(local[key])
            assert summary.get(key) == expected, key
        step_axes = {r["metric"].get("name") or r["metric"].get("glob_name"):
                     r["metric"].get("step_metric") for r in records(run_dir)
                     if r["type"] == "metric"}
        assert step_axes["kl/mean"] == step_axes["kl/beta"] == step_axes["reward/mean"] == "step"
        assert step_axes["*"] == "step"
    assert len(names) == 4
    # the grid's console: a line per job that starts and ends, the sweep's progress, no bars
    console = sweep_run.stdout
    for job in range(4):
        assert console.count(f"klsweep: job {job} started · schedule=") == 1
        assert console.count(f"klsweep: job {job} completed · reward/final=") == 1
    assert "4 of 4 jobs done · 4 completed · 0 running" in console and "█" not in console

    assert main([str(sweep), "--wandb"]) == 0
    report_dir = wandb_run_dir(sweep)
    (run,) = [r["run"] for r in records(report_dir) if r["type"] == "run"]
    assert run["job_type"] == "report" and run["run_group"] == "sweep"
    (logged,) = [r["history"]["item"] for r in records(report_dir) if r["type"] == "history"]
    assert logged["report/runs._type"] == "table-file" and logged["report/runs.nrows"] == 4
    assert logged["report/groups.nrows"] == 2
    for figure in ("kl_trajectories", "beta_trajectories", "reward_vs_kl", "tracking"):
        assert logged[f"report/{figure}._type"] == "image-file"
    table = json.loads((report_dir / "files" / logged["report/runs.path"]).read_text())
    with open(sweep / "runs.csv") as f:
        local = {row["run"]: row for row in csv.DictReader(f)}
    column = table["columns"].index
    for row in table["data"]:
        assert row[column("reward_final")] == pytest.approx(
            float(local[row[column("run")]]["reward_final"]))
    state = json.loads(inspect(report_dir, "--summary", "--json"))
    assert state["summary"]["report/best_tracking"] in {"fixed", "adaptive"}
    # the equal-drift comparison goes to W&B: its figure, and the table of equal_drift.md
    assert logged["report/equal_drift._type"] == "image-file"
    drift = json.loads((report_dir / "files" / logged["report/equal_drift_table.path"]
                        ).read_text())
    lines = (sweep / "equal_drift.md").read_text().splitlines()
    column = drift["columns"].index
    assert {row[column("group")] for row in drift["data"]} == {"fixed", "adaptive"}
    for row in drift["data"]:
        if row[column("seeds")]:
            shown = f"{row[column('reward_mean')]:.3f} ± {row[column('reward_std')]:.3f}"
            assert shown in next(line for line in lines
                                 if line.startswith(f"| {row[column('group')]} |"))
