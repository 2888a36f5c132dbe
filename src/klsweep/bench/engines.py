"""``python -m klsweep.bench.engines MODEL_DIR``: generated tokens/s of each rollout engine
(``native``, ``vllm``) on one saved transformers model and one batch: random prompts, the
same count of completions of the same length, temperature 1. vLLM needs to be installed
(``pip install 'klsweep[vllm]'``; CPU: scripts/vllm_cpu_env.sh). Start-up (vLLM loads the
model and sizes its cache) and one warm-up batch are not counted.

Each measurement runs in a process of its own, and the engines alternate from round to round
(native, vllm; vllm, native; ...): in one process vLLM's CPU worker binds the process's
OpenMP threads to its cores and turns ``torch.set_num_threads`` into a no-op, so whatever ran
after it ran on its binding. Both engines get ``--threads`` threads (torch's for native; vLLM's
OpenMP binding to the first that many cores, none reserved). The machine's 1-minute load
average is recorded before each measurement, and the CPU time the measurement received per
second per thread: OpenMP threads that wait for a core spin, so a step on a busy machine
slows many times over (a native figure 130× too low was once taken at load 13); a share well
below 1, or a load above the cores, says the figure is not this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

from klsweep.engines import RolloutEngine, build_engine
from klsweep.rollout import Prompts


def tokens_per_s(engine: RolloutEngine, prompts: Prompts, n_per_prompt: int,
                 repeats: int) -> tuple[float, float]:
    """Generated (unmasked) tokens per second over ``repeats`` batches, after one warm-up,
    and the CPU seconds this process used per wall second while it measured."""
    engine.sample(prompts, n_per_prompt)
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(repeats):
        tokens += int(engine.sample(prompts, n_per_prompt).mask.sum())
    wall = time.perf_counter() - start
    return tokens / wall, (time.process_time() - cpu) / wall


def measure_one(model_dir: str, engine_name: str, *, n_prompts: int, n_per_prompt: int,
                prompt_len: int, max_new_tokens: int, repeats: int, dtype: str, device: str,
                kv_cache_gib: float | None = None) -> tuple[float, float]:
    """(generated tokens/s, CPU seconds per wall second) of one engine on one batch of
    random prompts, in this process."""
    from transformers import AutoModelForCausalLM

    from klsweep.models.hf import HFCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    policy = HFCausalLM(model.to(device).eval())
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = Prompts.unpadded(torch.randint(vocab, (n_prompts, prompt_len),
                                             generator=generator).to(device))
    model_node = SimpleNamespace(name=model_dir, revision=None, dtype=dtype,
                                 trust_remote_code=False)
    rollout = SimpleNamespace(engine=engine_name, temperature=1.0, kv_cache_gib=kv_cache_gib,
                              gpu_memory_utilization=0.3, enforce_eager=True)
    # EOS: the last id, which a random model samples rarely; only generated tokens count
    engine = build_engine(rollout, model_node, policy, max_new_tokens=max_new_tokens,
                          eos_id=vocab - 1, seed=0)
    engine.load_weights(policy)
    return tokens_per_s(engine, prompts, n_per_prompt, repeats)


def engine_environment(engine: str, threads: int) -> dict[str, str]:
    """The environment a measurement's process starts with: vLLM's OpenMP threads bound to
    the first ``threads`` cores with none reserved (its default on x86 reserves one core per
    worker for its scheduler, which in-process has none to run)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if engine == "vllm":
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return env


def order(engines: list[str], round_index: int) -> list[str]:
    """The engines in the order of one round: as given, then reversed, alternately."""
    return engines if round_index % 2 == 0 else engines[::-1]


def _arguments(shape: dict[str, Any]) -> list[str]:
    """``measure_one``'s keywords as this command's options (None: left out)."""
    names = {"n_prompts": "prompts", "n_per_prompt": "n", "max_new_tokens": "tokens"}
    return [f"--{names.get(key, key).replace('_', '-')}={value}"
            for key, value in shape.items() if value is not None]


def measure(model_dir: str, *, engines: list[str], rounds: int, threads: int,
            **shape: Any) -> dict[str, Any]:
    """Every engine ``rounds`` times on the batch ``shape`` describes (``measure_one``'s
    keywords), each measurement in a fresh process, alternating the order; each run's
    tokens/s, CPU share and the load average before it, and the medians."""
    child_args = _arguments(shape)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for r in range(rounds):
        for name in order(engines, r):
            load = os.getloadavg()[0]
            result = subprocess.run(
                [sys.executable, "-m", "klsweep.bench.engines", model_dir, "--child", name,
                 "--threads", str(threads), *child_args],
                env=engine_environment(name, threads), capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"the {name} measurement failed: {tail}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            runs[name].append({"tokens_per_s": measured["tokens_per_s"],
                               "cpu_share": measured["cpu_per_s"] / threads,
                               "load_before": load})
    return {"threads": threads, "cores": os.cpu_count(), "runs": runs,
            "median_tokens_per_s": {name: statistics.median(r["tokens_per_s"] for r in rs)
                                    for name, rs in runs.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klsweep.bench.engines",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a save_pretrained directory")
    parser.add_argument("--engines", nargs="+", default=["native", "vllm"])
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads of each engine (default: every core)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--repeats", type=int, default=3, help="batches timed per measurement")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument("--child", metavar="ENGINE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(n_prompts=args.prompts, n_per_prompt=args.n, prompt_len=args.prompt_len,
                 max_new_tokens=args.tokens, repeats=args.repeats, dtype=args.dtype,
                 device=args.device, kv_cache_gib=args.kv_cache_gib)
    if args.child:  # one measurement, in the process the parent started for it
        torch.set_num_threads(args.threads)
        rate, cpu = measure_one(args.model_dir, args.child, **shape)
        print(json.dumps({"tokens_per_s": rate, "cpu_per_s": cpu}))
        return
    result = measure(args.model_dir, engines=args.engines, rounds=args.rounds,
                     threads=args.threads, **shape)
    busy = [run for runs in result["runs"].values() for run in runs
            if run["load_before"] > result["cores"]]
    print(json.dumps({"batch": f"{args.prompts}x{args.n}x{args.tokens}", **result}))
    if busy:
        print(f"klsweep.bench.engines: the load average exceeded the {result['cores']} cores "
              f"before {len(busy)} measurement(s): those figures are not this machine's",
              file=sys.stderr)


if __name__ == "__main__":
    main()
