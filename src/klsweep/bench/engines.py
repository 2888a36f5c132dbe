"""``python -m klsweep.bench.engines MODEL_DIR``: generated tokens/s of each rollout engine
(``native``, ``vllm``) on one saved transformers model and one batch: random prompts, the
same count of completions of the same length, temperature 1. vLLM needs to be installed
(``pip install 'klsweep[vllm]'``; CPU: scripts/vllm_cpu_env.sh). Start-up (vLLM loads the
model and sizes its cache) and one warm-up batch are not counted."""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from klsweep.engines import RolloutEngine, build_engine
from klsweep.rollout import Prompts


def tokens_per_s(engine: RolloutEngine, prompts: Prompts, n_per_prompt: int,
                 repeats: int) -> float:
    """Generated (unmasked) tokens per second over ``repeats`` batches, after one warm-up."""
    engine.sample(prompts, n_per_prompt)
    tokens, start = 0, time.perf_counter()
    for _ in range(repeats):
        tokens += int(engine.sample(prompts, n_per_prompt).mask.sum())
    return tokens / (time.perf_counter() - start)


def measure(model_dir: str, *, engines: list[str], n_prompts: int, n_per_prompt: int,
            prompt_len: int, max_new_tokens: int, repeats: int, dtype: str,
            device: str, kv_cache_gib: float | None = None) -> dict[str, float]:
    """``{engine: generated tokens/s}`` on one batch of random prompts."""
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
    results = {}
    for name in engines:
        rollout = SimpleNamespace(engine=name, temperature=1.0, kv_cache_gib=kv_cache_gib,
                                  gpu_memory_utilization=0.3, enforce_eager=True)
        # EOS: the last id, which a random model samples rarely; only generated tokens count
        engine = build_engine(rollout, model_node, policy, max_new_tokens=max_new_tokens,
                              eos_id=vocab - 1, seed=0)
        engine.load_weights(policy)
        results[name] = tokens_per_s(engine, prompts, n_per_prompt, repeats)
        del engine
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klsweep.bench.engines",
                                     description=__doc__)
    parser.add_argument("model_dir", help="a save_pretrained directory")
    parser.add_argument("--engines", nargs="+", default=["native", "vllm"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    args = parser.parse_args(argv)
    result = measure(args.model_dir, engines=args.engines, n_prompts=args.prompts,
                     n_per_prompt=args.n, prompt_len=args.prompt_len,
                     max_new_tokens=args.tokens, repeats=args.repeats, dtype=args.dtype,
                     device=args.device, kv_cache_gib=args.kv_cache_gib)
    print(json.dumps({"batch": f"{args.prompts}x{args.n}x{args.tokens}",
                      "tokens_per_s": result}))


if __name__ == "__main__":
    main()
