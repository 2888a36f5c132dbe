"""``python -m klsweep.bench``: the speed of one training step, end to end.

Runs the real module (rollout with the KV cache, reference pass, update, logging) on the
shape of DESIGN §11: a GPT-2-shaped policy of 2 layers × 128 wide, 4 heads, vocabulary 32,
8 prompts × 8 completions × 16 new tokens for GRPO. Reports generated tokens/s, step time
and peak memory, after warm-up steps that are not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import warnings

import lightning as L
import torch
from torch import Tensor

from klsweep.config import compose_and_validate
from klsweep.models.tiny import TinyConfig, TinyGPT
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import from_node
from klsweep.tasks.base import Task
from klsweep.train import build_module


class SpeedTask(Task):
    """Random prompts, a cheap reward, and no EOS, so that every completion has exactly
    ``max_new_tokens`` tokens and the token count is the nominal one."""

    name = "speed"

    def __init__(self, vocab_size: int, prompt_len: int, max_new_tokens: int) -> None:
        self.vocab_size = vocab_size
        self.eos_id = vocab_size  # never sampled
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        return Prompts.unpadded(torch.randint(0, self.vocab_size, (n, self.prompt_len),
                                              generator=generator))

    def reward(self, rollout: Rollout) -> Tensor:
        return ((rollout.completions % 2 == 0) & rollout.mask).float().mean(1)


def measure(algo: str, steps: int, warmup: int, threads: int, overrides: list[str]) -> dict:
    torch.set_num_threads(threads)
    cfg = compose_and_validate({"algo": algo, "schedule": "fixed", "logger": "none",
                                "trainer": "cpu" if not torch.cuda.is_available() else "gpu",
                                "steps": str(steps + warmup),
                                **dict(o.split("=", 1) for o in overrides)})
    task = SpeedTask(vocab_size=32, prompt_len=8, max_new_tokens=16)
    L.seed_everything(0, verbose=False)
    block_size = task.prompt_len + task.max_new_tokens
    policy = TinyGPT(from_node(TinyConfig, cfg.model), task.vocab_size, block_size)
    reference = TinyGPT(from_node(TinyConfig, cfg.model), task.vocab_size, block_size)
    reference.load_state_dict(policy.state_dict())
    module = build_module(cfg, task, (policy, reference.requires_grad_(False)))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator=cfg.trainer.accelerator, devices=1,
                        precision=cfg.trainer.precision)
    trainer.fit(module)
    rows = module.history[warmup:]
    step_s = [row["perf/step_s"] for row in rows]
    tokens = sum(row["perf/tokens"] for row in rows)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"algo": algo, "threads": threads, "steps": len(rows),
            "tokens_per_step": tokens / len(rows), "tokens_per_s": tokens / sum(step_s),
            "step_ms_median": 1000 * statistics.median(step_s),
            "samples_per_s": sum(row["perf/samples"] for row in rows) / sum(step_s),
            "pairs_per_s": sum(row.get("dpo/pairs", 0.0) for row in rows) / sum(step_s),
            "peak_memory_mb": peak_mb, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klsweep.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. algo.group_size=16")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = measure(args.algo, args.steps, args.warmup, args.threads, args.overrides)
    if args.json:
        print(json.dumps(result))
        return
    rate = (f"{result['pairs_per_s']:,.0f} pairs/s" if result["pairs_per_s"]
            else f"{result['tokens_per_s']:,.0f} generated tokens/s")
    print(f"{result['algo']} on {result['device']} ({result['threads']} threads): {rate}, "
          f"{result['samples_per_s']:,.0f} samples/s, "
          f"step {result['step_ms_median']:.1f} ms (median of {result['steps']}), "
          f"{result['tokens_per_step']:.0f} tokens/step, "
          f"peak memory {result['peak_memory_mb']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
