"""The GPU check of the real-model path, in one call of a few minutes on one GPU.

Builds a Qwen2-shaped model from a config (Qwen2.5-0.5B's sizes, random weights: nothing is
downloaded), and runs GRPO and DPO steps through the real module in bf16, with full
fine-tuning and with LoRA. Prints, per run: generated tokens/s (GRPO) or pairs/s (DPO), the
median step time and its phases (sampling, reference pass, policy pass), peak GPU memory,
the training passes' fraction of the GPU's bf16 peak and decoding's fraction of the HBM
bandwidth bound at the batch used. Last, generated tokens/s of the rollout engines (native
and, where installed, vLLM) on the same model and batch.

    python scripts/gpu_check.py                    # on a CUDA machine
    python scripts/gpu_check.py --small --device cpu --steps 2   # a smoke test anywhere

``--peak-tflops`` and ``--hbm-tbs`` default to an H100/H200's dense bf16 peak and H200's
bandwidth; set them for another GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import warnings
from typing import Any

import lightning as L
import torch

from klsweep.bench.run import SpeedTask
from klsweep.bench.timing import PhaseClock, timed_phases
from klsweep.config import choice_config, compose_and_validate
from klsweep.models.hf_build import build_hf
from klsweep.train import build_module

# Qwen2.5-0.5B: 24 layers of 896, 14 query and 2 key/value heads, MLP 4864, tied embeddings
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, vocab_size=512)


def save_qwen2(sizes: dict, directory: str) -> str:
    """A randomly initialised Qwen2 of ``sizes``, saved where model.name can load it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**sizes, tie_word_embeddings=True, max_position_embeddings=4096)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


class DropWarmup(L.Callback):
    """Restarts the phase totals once the warm-up steps are done."""

    def __init__(self, clock: PhaseClock, warmup: int) -> None:
        self.clock, self.warmup = clock, warmup

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == self.warmup:
            self.clock.take()


def run(algo: str, lora: bool, model_dir: str, args: argparse.Namespace) -> dict:
    sizes = SMALL if args.small else QWEN2_05B
    overrides = {"algo": algo, "schedule": "fixed", "logger": "none", "trainer": "cpu",
                 "steps": str(args.steps + args.warmup), "trainer.accelerator": args.device,
                 "trainer.precision": "bf16-true" if args.device == "cuda" else "32-true"}
    if algo == "dpo":
        overrides |= {"algo.pairs_per_step": str(args.pairs), "algo.dataset_pairs":
                      str(args.pairs * (args.steps + args.warmup)), "algo.eval_every": "1000"}
    else:
        overrides |= {"algo.prompts_per_step": str(args.prompts),
                      "algo.group_size": str(args.group)}
    cfg = compose_and_validate(overrides)
    task = SpeedTask(vocab_size=sizes["vocab_size"], prompt_len=args.prompt_len,
                     max_new_tokens=args.new_tokens)
    L.seed_everything(0, verbose=False)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model_cfg = choice_config(
        "model", "hf", name=model_dir,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
        if lora else None)
    policy, reference = build_hf(model_cfg, task)
    module = build_module(cfg, task, (policy, reference))
    clock = PhaseClock(torch.cuda.synchronize if args.device == "cuda" else None)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DropWarmup(clock, args.warmup)],
                        accelerator=args.device, devices=1, precision=cfg.trainer.precision)
    with timed_phases(module, clock):
        trainer.fit(module)
    rows = module.history[args.warmup:]
    step_s = [row["perf/step_s"] for row in rows]
    n_params = sum(p.numel() for name, p in policy.named_parameters() if "lora_" not in name)
    tokens_per_step = statistics.mean(row["perf/tokens"] for row in rows)
    step = statistics.median(step_s)
    phase = {name: total / len(rows) for name, total in clock.take().items()}  # s a step
    # dense transformer FLOPs: 2·N per token forward, 6·N forward + backward (Kaplan et al.)
    rollouts = args.prompts * args.group if algo == "grpo" else 2 * args.pairs
    seq = args.prompt_len + args.new_tokens
    train_flops = 6 * n_params * rollouts * seq + 2 * n_params * rollouts * seq  # policy, ref
    train_s = sum(phase.get(name, 0.0)
                  for name in ("reference", "policy.forward", "policy.backward"))
    result = {
        "algo": algo, "lora": lora, "device": args.device, "params": n_params,
        "step_ms": 1000 * step, "phases_ms": {k: 1000 * v for k, v in phase.items()},
        "tokens_per_s": tokens_per_step / step if algo == "grpo" else None,
        "pairs_per_s": args.pairs / step if algo == "dpo" else None,
        "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30
                           if args.device == "cuda" else None),
    }
    if args.device == "cuda" and train_s > 0:
        result["train_fraction_of_bf16_peak"] = train_flops / train_s / (args.peak_tflops * 1e12)
    if args.device == "cuda" and "sampling" in phase and algo == "grpo":
        # each decoding step reads every weight once (2 bytes in bf16) at this batch
        bound_s = args.new_tokens * 2 * n_params / (args.hbm_tbs * 1e12)
        result["decode_fraction_of_hbm_bound"] = bound_s / phase["sampling"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny Qwen2 (smoke test)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--hbm-tbs", type=float, default=4.8)
    parser.add_argument("--engines", nargs="*", default=["native", "vllm"],
                        help="rollout engines compared in generated tokens/s (vllm: if installed)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sizes = SMALL if args.small else QWEN2_05B
    with tempfile.TemporaryDirectory() as directory:
        model_dir = save_qwen2(sizes, directory)
        for algo in ("grpo", "dpo"):
            for lora in (False, True):
                print(json.dumps(run(algo, lora, model_dir, args)), flush=True)
        print(json.dumps(compare_engines(model_dir, args)), flush=True)


def compare_engines(model_dir: str, args: argparse.Namespace) -> dict:
    """Generated tokens/s of each rollout engine on the same bf16 model and batch (GRPO's:
    --prompts x --group completions of --new-tokens); vLLM where it is installed."""
    import importlib.util

    from klsweep.bench.engines import measure

    engines = [e for e in args.engines if e != "vllm" or importlib.util.find_spec("vllm")]
    result = measure(model_dir, engines=engines, rounds=1, threads=1, n_prompts=args.prompts,
                     n_per_prompt=args.group, prompt_len=args.prompt_len,
                     max_new_tokens=args.new_tokens, repeats=args.steps, dtype="bfloat16",
                     device=args.device)
    return {"check": "engines", "batch": f"{args.prompts}x{args.group}x{args.new_tokens}",
            "tokens_per_s": result["median_tokens_per_s"],
            "skipped": sorted(set(args.engines) - set(engines))}


if __name__ == "__main__":
    main()
