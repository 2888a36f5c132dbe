"""What Slurm costs a sweep, measured on a running cluster (scripts/slurm_local.sh start):

1. the same Optuna study through klsweep_local and through submitit_slurm, two trials at a
   time: each trial's duration as Optuna records it (asked to told), and inside a Slurm trial
   the run's own wall time, so that the rest is the job's start (sbatch, scheduling, a fresh
   interpreter importing torch and Lightning) and the sweep noticing its result;
2. a trial requeued mid-run (``scontrol requeue``): the seconds until Slurm shows it pending,
   running again, and until its run logs the first step after its checkpoint.

    python scripts/slurm_timing.py [--trials 8] [--requeues 3] [--dir DIR]

Prints Markdown tables and the load average before and after each part. The machine's load
moves every figure: measure on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY = ["sweep=beta_target", "task=exact", "logger=none", "trainer.enable_progress_bar=false"]


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def sweep(sweep_dir: Path, *args: str, background: bool = False):
    command = [sys.executable, "-m", "klsweep", "-m", *STUDY, *args,
               f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="beta_target",
                             storage=f"sqlite:///{sweep_dir / 'optuna.db'}").trials


def run_wall_s(trial: optuna.trial.FrozenTrial) -> float:
    summary = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
    return summary["wall_time_s"]


def overhead(root: Path, n_trials: int) -> None:
    print(f"## Per trial: the same study, {n_trials} trials of 40 steps, two at a time\n")
    print(f"load before: {load()}\n")
    rows = []
    for name, launcher in (("klsweep_local", []),
                           ("submitit_slurm", ["hydra/launcher=submitit_slurm",
                                               "hydra.launcher.array_parallelism=2"])):
        sweep_dir = root / name
        started = time.perf_counter()
        sweep(sweep_dir, f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_jobs=2",
              *launcher)
        wall = time.perf_counter() - started
        done = trials(sweep_dir)
        durations = [t.duration.total_seconds() for t in done]
        runs = [run_wall_s(t) for t in done]
        rows.append((name, wall, statistics.mean(durations), statistics.mean(runs)))
    print("| launcher | sweep wall s | trial s (mean, asked to told) | run's own wall s (mean) "
          "| trial − run s |")
    print("|---|---|---|---|---|")
    for name, wall, trial_s, run_s in rows:
        print(f"| {name} | {wall:.1f} | {trial_s:.1f} | {run_s:.1f} | {trial_s - run_s:.1f} |")
    print(f"\nper-trial overhead of submitit_slurm: {rows[1][2] - rows[0][2]:.1f} s; "
          f"load after: {load()}\n")


def requeue_times(root: Path, repeats: int) -> None:
    print(f"## From scontrol requeue to resumed training ({repeats} requeues)\n")
    print(f"load before: {load()}\n")
    print("| pending s | running again s | first step after the checkpoint s |")
    print("|---|---|---|")
    for i in range(repeats):
        sweep_dir = root / f"requeue{i}"
        process = sweep(sweep_dir, "steps=300", "hydra.sweeper.n_trials=1",
                        "hydra/launcher=submitit_slurm", background=True)
        metrics = sweep_dir / "0" / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 10:
            time.sleep(0.02)
        hydra = yaml.safe_load((sweep_dir / "0" / ".hydra" / "hydra.yaml").read_text())
        job = str(hydra["hydra"]["job"]["id"])
        subprocess.run(["scontrol", "requeue", job], check=True)
        requeued = time.perf_counter()
        seen: dict[str, float] = {}
        stopped_at = None
        while True:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                   text=True).stdout.strip()
            now = time.perf_counter() - requeued
            if state == "PENDING" or "PENDING" in seen:  # the old run's RUNNING is not counted
                seen.setdefault(state, now)
            count = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if state == "PENDING" and stopped_at is None:
                stopped_at = count  # the checkpoint's step: the rows the run kept
            if stopped_at is not None and count > stopped_at:
                break
            time.sleep(0.02)
        print(f"| {seen['PENDING']:.1f} | {seen.get('RUNNING', now):.1f} | {now:.1f} |")
        process.wait()
    print(f"\nload after: {load()}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--requeues", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="klsweep-slurm-timing-"))
    overhead(root, args.trials)
    requeue_times(root, args.requeues)


if __name__ == "__main__":
    main()
