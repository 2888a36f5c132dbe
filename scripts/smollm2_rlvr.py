"""A benchmark, not a test: SmolLM2-135M-Instruct on a reasoning-gym dataset, its reference
evaluation and GRPO at two or more fixed β, on CPU, with the wall time of each run and the
pass@k table of the report.

    python scripts/smollm2_checkpoint.py ~/models/smollm2-135m-instruct     # once
    python scripts/smollm2_rlvr.py ~/models/smollm2-135m-instruct --out sweeps/smollm2-rlvr

Each β is its own run (one at a time: two 135M-parameter runs on two cores would only slow
each other), then ``python -m klsweep.report`` draws pass@k per β against the reference and
writes the table this script prints. ``--dry-run`` prints the commands.

The settings, and why:
* one-digit sums of two terms (chain_sum): SmolLM2 answers them in a sentence ("The answer
  is 3."), so the last-number fallback reads them; the chat prompt carries reasoning-gym's
  ``direct`` instruction (answer in <answer> tags, no reasoning), which keeps completions
  short; 32 new tokens;
* ``rollout.temperature=0.5``: at 1.0 the model is right far less often (on 16 one-digit chain
  sums, 11 right at 0.5 and 1 at 1.0, as measured when this task was planned); evaluation
  samples at the same temperature;
* 4 prompts × 4 completions a step, ``optim.lr=1e-5`` (ten times the pretrained default of
  1e-6: a run of tens of steps moves little at TRL's rate), ``threads=2`` (both cores);
* 30 updates by default; each run evaluates the reference and, at its end, the policy on 32
  held-out questions × 8 samples (pass@1 to pass@8).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [
    "model=hf", "task=reasoning", "task.dataset=chain_sum", "task.dataset_config=null",
    "+task.dataset_config.min_terms=2", "+task.dataset_config.max_terms=2",
    "+task.dataset_config.min_digits=1", "+task.dataset_config.max_digits=1",
    "task.system_prompt=direct", "task.train_size=2000", "task.max_new_tokens=32",
    "rollout.temperature=0.5", "algo=grpo", "algo.prompts_per_step=4", "algo.group_size=4",
    "schedule=fixed", "optim.lr=1e-5", "eval.prompts=32", "eval.samples=8",
    "eval.k=[1,2,4,8]", "threads=2", "logger=none", "trainer.enable_progress_bar=false",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/smollm2_rlvr.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the checkpoint smollm2_checkpoint.py wrote")
    parser.add_argument("--out", type=Path, default=Path("sweeps/smollm2-rlvr"))
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*", help="more klsweep overrides for every run")
    args = parser.parse_args(argv)
    if len(args.betas) < 2:
        parser.error("--betas needs two or more values")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    walls = {}
    for beta in args.betas:
        run_dir = args.out / f"beta-{beta:g}"
        command = [sys.executable, "-m", "klsweep", *SETTINGS, f"model.name={args.model}",
                   f"kl.beta={beta}", f"steps={args.steps}", f"eval.every={args.steps}",
                   f"seed={args.seed}", *args.overrides, f"hydra.run.dir={run_dir}"]
        print(" ".join(command), flush=True)
        if args.dry_run:
            continue
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        walls[beta] = time.perf_counter() - started
    if args.dry_run:
        return
    subprocess.run([sys.executable, "-m", "klsweep.report", str(args.out)], env=env, check=True)
    report = (args.out / "report.md").read_text()
    start = report.index("## pass@k against the reference")
    print(report[start:report.index("\n## ", start + 1)])
    for beta, wall in walls.items():
        print(f"β = {beta:g}: {wall:.0f} s wall (reference evaluation, {args.steps} GRPO "
              f"steps, final evaluation)")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
