"""``python -m klsweep.bench``: the speed of one training step, end to end, against this
machine's limit.

Runs the real training loop (Lightning, the module, sampling with the KV cache, the reference
pass, the update, logging) on the shape of DESIGN §11: a GPT-2-shaped policy of 2 layers ×
128 wide, 4 heads, vocabulary 32, prompts of 8 tokens, 16 new tokens; GRPO 8 prompts × 8
completions, PPO 16 × 4, DPO 32 pairs a step. Warm-up steps are not counted.

The limit: one warm-up step runs under ``FlopCounterMode``, which sees every matrix product
(the linear layers forward and backward, attention) and the phase it ran in; each distinct
shape is then timed alone, with the run's thread count. Their sum is the step's roofline: the
time it would take doing nothing but its matrix products at this machine's measured rate on
the model's own shapes. The fraction reached is that time over the measured step.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from klsweep.config import compose_and_validate
from klsweep.models.tiny import TinyConfig, untrained_tiny
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import from_node
from klsweep.tasks.base import Task
from klsweep.train import build_module

PHASES = ("sampling", "reference", "policy.forward", "policy.backward", "optimiser", "other")
# Each algorithm's benchmark batch (DESIGN §11), before the command line's overrides.
PRESETS = {"grpo": [], "ppo": [], "dpo": ["algo.pairs_per_step=32"]}
PROMPT_LEN, MAX_NEW_TOKENS, VOCAB = 8, 16, 32

aten = torch.ops.aten
Gemm = tuple[int, int, int, int]  # (batch, M, K, N): a [batch, M, K] × [batch, K, N] product


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


# --- where the time goes -----------------------------------------------------------------------
class PhaseClock:
    """Wall time inside named phases. Phases nest; time counts to the innermost one, so no
    second is counted twice. ``take`` returns the totals so far and starts again."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list[Any]] = []  # [name, start, time of the phases inside it]
        # on CUDA, kernels run asynchronously: a phase ends when its kernels have
        self.synchronize = synchronize or (lambda: None)

    @property
    def current(self) -> str:
        return self._open[-1][0] if self._open else "other"

    def enter(self, name: str) -> None:
        self.synchronize()
        self._open.append([name, time.perf_counter(), 0.0])

    def exit(self) -> None:
        self.synchronize()
        name, start, inner = self._open.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - inner
        if self._open:
            self._open[-1][2] += elapsed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def take(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


@contextmanager
def timed_phases(module: L.LightningModule, clock: PhaseClock) -> Iterator[None]:
    """The pair's and the module's calls wrapped in phases, for this benchmark only: the hot
    path carries no timing code. (The optimiser's ``step`` is timed by hooks, ``StepLog``.)"""
    pair = module.pair
    seams = {(pair, "sample"): "sampling", (pair, "sample_reference"): "sampling",
             (pair, "reference_logprobs"): "reference",
             (pair, "policy_logprobs"): "policy.forward",
             (pair, "completion_features"): "policy.forward",
             (module, "manual_backward"): "policy.backward",
             (module, "clip_gradients"): "optimiser"}
    for (owner, attr), name in seams.items():
        setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr in seams:
            delattr(owner, attr)  # the class's method shows through again


# --- what the step computes ----------------------------------------------------------------------
def _gemms_mm(a: tuple, b: tuple, *_: Any, **__: Any) -> list[Gemm]:
    return [(1, a[0], a[1], b[1])]


def _gemms_addmm(bias: tuple, a: tuple, b: tuple, *_: Any, **__: Any) -> list[Gemm]:
    return _gemms_mm(a, b)


def _gemms_bmm(a: tuple, b: tuple, *_: Any, **__: Any) -> list[Gemm]:
    return [(a[0], a[1], a[2], b[2])]


def _gemms_baddbmm(bias: tuple, a: tuple, b: tuple, *_: Any, **__: Any) -> list[Gemm]:
    return _gemms_bmm(a, b)


def _gemms_sdpa(q: tuple, k: tuple, v: tuple, *_: Any, **__: Any) -> list[Gemm]:
    """QKᵀ and PV, as ``sdpa_flop_count`` counts them."""
    bh, t, d, s = q[0] * q[1], q[2], q[3], k[2]
    return [(bh, t, d, s), (bh, t, s, v[3])]


def _gemms_sdpa_backward(grad: tuple, q: tuple, k: tuple, v: tuple, *_: Any,
                         **__: Any) -> list[Gemm]:
    """The recomputed QKᵀ, then dP, dV, dQ and dK, as ``sdpa_backward_flop_count``."""
    bh, t, d, s, dv = q[0] * q[1], q[2], q[3], k[2], v[3]
    return [(bh, t, d, s), (bh, t, dv, s), (bh, s, t, dv), (bh, t, s, d), (bh, d, t, s)]


def _cpu_sdpa_flops(q: tuple, k: tuple, v: tuple, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad: tuple, q: tuple, k: tuple, v: tuple, *_: Any,
                             **__: Any) -> int:
    return sdpa_backward_flop_count(grad, q, k, v)


# op → (its FLOPs from shapes, the GEMMs it does). torch's registry lacks CPU attention.
MATMUL_OPS: dict[Any, tuple[Callable, Callable]] = {
    aten.mm: (flop_registry[aten.mm], _gemms_mm),
    aten.addmm: (flop_registry[aten.addmm], _gemms_addmm),
    aten.bmm: (flop_registry[aten.bmm], _gemms_bmm),
    aten.baddbmm: (flop_registry[aten.baddbmm], _gemms_baddbmm),
    aten._scaled_dot_product_flash_attention_for_cpu: (_cpu_sdpa_flops, _gemms_sdpa),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (_cpu_sdpa_backward_flops,
                                                                 _gemms_sdpa_backward),
}


class PhaseFlops:
    """``FlopCounterMode`` that also records, per phase of ``clock``, every GEMM shape it
    counted and how often, for timing them afterwards."""

    def __init__(self, clock: PhaseClock | None = None) -> None:
        self.clock = clock or PhaseClock()
        self.flops: Counter[str] = Counter()
        self.gemms: dict[str, Counter[Gemm]] = defaultdict(Counter)
        mapping = {op: self._recording(flops, gemms) for op, (flops, gemms) in MATMUL_OPS.items()}
        self.mode = FlopCounterMode(display=False, custom_mapping=mapping)

    def _recording(self, flops_of: Callable, gemms_of: Callable) -> Callable:
        def count(*shapes: Any, out_shape: Any = None, **kwargs: Any) -> int:
            flops = flops_of(*shapes, **kwargs)
            phase = self.clock.current
            self.flops[phase] += flops
            self.gemms[phase].update(gemms_of(*shapes, **kwargs))
            return flops
        return count

    def __enter__(self) -> PhaseFlops:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


# --- the machine's rate on those shapes ------------------------------------------------------
def gemm_seconds(gemm: Gemm, repeats: int = 7, min_batch_s: float = 2e-3) -> float:
    """Seconds one product of this shape takes here: the median over ``repeats`` batches of
    calls into a preallocated output, so that nothing but the product is timed."""
    b, m, k, n = gemm
    a, w, out = torch.randn(b, m, k), torch.randn(b, k, n), torch.empty(b, m, n)
    product = ((lambda: torch.mm(a[0], w[0], out=out[0])) if b == 1
               else (lambda: torch.bmm(a, w, out=out)))
    product()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_batch_s:
        product()
        calls += 1
    per_batch = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            product()
        per_batch.append((time.perf_counter() - start) / calls)
    return statistics.median(per_batch)


def roofline(counted: PhaseFlops) -> dict[str, dict[str, float]]:
    """Per phase: the FLOPs of a step and the seconds its GEMMs take at the measured rate."""
    shapes = {g for gemms in counted.gemms.values() for g in gemms}
    seconds = {g: gemm_seconds(g) for g in sorted(shapes)}
    return {phase: {"flops": counted.flops[phase],
                    "roofline_s": sum(n * seconds[g] for g, n in counted.gemms[phase].items())}
            for phase in counted.flops}


# --- the run -----------------------------------------------------------------------------------
class StepLog(L.Callback):
    """Marks the end of every training step (so that a step's time is the whole loop's,
    Lightning included), takes each step's phase times, times the optimiser's ``step`` by
    hooks, and counts the FLOPs of step ``count_step``."""

    def __init__(self, clock: PhaseClock, count_step: int, profile_from: int | None) -> None:
        self.clock, self.count_step, self.profile_from = clock, count_step, profile_from
        self.ends: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.counted = PhaseFlops(clock)
        self.profiler = torch.profiler.profile() if profile_from is not None else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_pre_hook(lambda *_: self.clock.enter("optimiser"))
            optimizer.register_step_post_hook(lambda *_: self.clock.exit())
        self.ends.append(time.perf_counter())

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.count_step:
            self.counted.__enter__()
        if batch_idx == self.profile_from:
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx == self.count_step:
            self.counted.__exit__(None, None, None)
        self.ends.append(time.perf_counter())
        self.phases.append(self.clock.take())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def _config(algo: str, steps: int, overrides: list[str]) -> Any:
    values = dict(o.split("=", 1) for o in PRESETS.get(algo, []) + overrides)
    return compose_and_validate({"algo": algo, "schedule": "fixed", "logger": "none",
                                 "trainer": "cpu" if not torch.cuda.is_available() else "gpu",
                                 "steps": str(steps), **values})


def _models(cfg: Any, task: SpeedTask) -> tuple[nn.Module, nn.Module]:
    """A fresh policy and its copy as the frozen reference (no reference training)."""
    return untrained_tiny(from_node(TinyConfig, cfg.model), task.vocab_size,
                          task.prompt_len + task.max_new_tokens)


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(algo: str, steps: int, warmup: int, threads: int, overrides: list[str],
            profile: int = 0) -> dict:
    """Train ``warmup + steps (+ profile)`` steps; time ``steps`` after the warm-up; count
    and time the FLOPs of the last warm-up step; profile the ``profile`` steps after them."""
    if warmup < 1:
        raise ValueError("--warmup must be >= 1: a warm-up step is the one whose FLOPs count")
    torch.set_num_threads(threads)
    cfg = _config(algo, warmup + steps + profile, overrides)
    task = SpeedTask(VOCAB, PROMPT_LEN, MAX_NEW_TOKENS)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, task, _models(cfg, task))
    clock = PhaseClock()
    log = StepLog(clock, count_step=warmup - 1,
                  profile_from=warmup + steps if profile else None)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator=cfg.trainer.accelerator, devices=1,
                        precision=cfg.trainer.precision, callbacks=[log])
    with timed_phases(module, clock):
        trainer.fit(module)
    peak_mib = _peak_memory_mib()
    measured = slice(warmup, warmup + steps)
    record = summarize(algo, cfg, module.history[measured], log.ends[warmup:warmup + steps + 1],
                       log.phases[measured], threads, peak_mib, roofline(log.counted))
    if profile:
        wall_s = log.ends[-1] - log.ends[warmup + steps]
        record["kernels"] = kernel_times(log.profiler, wall_s, profile)
    return record


# Kinds of kernel the profile sums self time into; matched on the aten op's name.
KERNEL_KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
                "attention": ("scaled_dot_product",), "gelu": ("gelu",),
                "layer_norm": ("layer_norm",)}


def _kind(op: str) -> str:
    if op in KERNEL_KINDS["matmul"]:
        return "matmul"
    return next((kind for kind, names in KERNEL_KINDS.items() if kind != "matmul"
                 and any(name in op for name in names)), "other ops")


def kernel_times(profiler: torch.profiler.profile, wall_s: float, steps: int) -> dict:
    """Milliseconds a step in each kind of aten kernel (self time), and outside them all:
    Python, Lightning and dispatch (the profiler's own overhead included)."""
    ms: Counter[str] = Counter()
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            ms[_kind(event.key)] += event.self_cpu_time_total / 1000 / steps
    ms["outside kernels"] = 1000 * wall_s / steps - sum(ms.values())
    return dict(ms)


def summarize(algo: str, cfg: Any, rows: list[dict], ends: list[float],
              phases: list[dict[str, float]], threads: int, peak_mib: float,
              roof: dict[str, dict[str, float]]) -> dict:
    """The JSON record of the measured steps (``rows``, the end of the step before each and
    of each, ``phases``): throughput over the whole loop's wall time, the step, memory, the
    roofline and the breakdown by phase (means a step)."""
    loop_s = [b - a for a, b in itertools.pairwise(ends)]
    wall_s, n = sum(loop_s), len(loop_s)
    phase_s = {p: sum(step.get(p, 0.0) for step in phases) / n for p in PHASES}
    phase_s["other"] = wall_s / n - sum(v for p, v in phase_s.items() if p != "other")
    flops = sum(r["flops"] for r in roof.values())
    roof_s = sum(r["roofline_s"] for r in roof.values())
    step_s = wall_s / n
    tokens = sum(row["perf/tokens"] for row in rows)
    return {
        "algo": algo, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": threads, "load_average": os.getloadavg()[0], "steps": n,
        "shape": {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
                  "n_head": cfg.model.n_head, "vocab": VOCAB, "prompt_len": PROMPT_LEN,
                  "new_tokens": MAX_NEW_TOKENS},
        "tokens_per_step": tokens / n, "tokens_per_s": tokens / wall_s,
        "samples_per_s": sum(row["perf/samples"] for row in rows) / wall_s,
        "pairs_per_s": sum(row.get("dpo/pairs", 0.0) for row in rows) / wall_s,
        "step_ms": 1000 * step_s, "step_ms_median": 1000 * statistics.median(loop_s),
        "step_ms_inside": 1000 * statistics.median(row["perf/step_s"] for row in rows),
        "peak_memory_mib": peak_mib,
        "memory": "CUDA max allocated" if torch.cuda.is_available() else "max RSS",
        "gflop_per_step": flops / 1e9, "gflop_per_s": flops / step_s / 1e9,
        "roofline_ms": 1000 * roof_s, "roofline_gflop_per_s": flops / roof_s / 1e9,
        "roofline_fraction": roof_s / step_s,
        "phases": {p: {"ms": 1000 * phase_s[p], "share": phase_s[p] / step_s,
                       "gflop": roof.get(p, {}).get("flops", 0) / 1e9,
                       "roofline_ms": 1000 * roof.get(p, {}).get("roofline_s", 0.0)}
                   for p in PHASES},
    }


def report(r: dict) -> str:
    """The human-readable summary of ``measure``'s record."""
    rate = (f"{r['pairs_per_s']:,.0f} pairs/s" if r["pairs_per_s"]
            else f"{r['tokens_per_s']:,.0f} generated tokens/s")
    lines = [
        f"{r['algo']} on {r['device']}, {r['threads']} threads, load {r['load_average']:.1f}: "
        f"{rate} · step {r['step_ms']:.1f} ms (median {r['step_ms_median']:.1f}, "
        f"{r['steps']} steps) · peak memory {r['peak_memory_mib']:.0f} MiB ({r['memory']})",
        f"roofline: {r['gflop_per_step']:.2f} GFLOP a step; its matrix products alone take "
        f"{r['roofline_ms']:.1f} ms here ({r['roofline_gflop_per_s']:.0f} GFLOP/s) → "
        f"{100 * r['roofline_fraction']:.0f}% of the roofline "
        f"({r['gflop_per_s']:.0f} GFLOP/s reached)",
        f"{'phase':<16}{'ms/step':>9}{'share':>7}{'GFLOP':>8}{'roofline ms':>13}",
    ]
    for name, p in r["phases"].items():
        lines.append(f"{name:<16}{p['ms']:>9.1f}{100 * p['share']:>6.0f}%{p['gflop']:>8.2f}"
                     f"{p['roofline_ms']:>13.1f}")
    cores = os.cpu_count() or 1
    if r["load_average"] > cores:
        lines.append(f"note: load {r['load_average']:.1f} on {cores} cores; these times include "
                     f"waiting for other processes (with several threads, at every op)")
    if "kernels" in r:
        total = sum(r["kernels"].values())
        lines.append("profiled steps, ms a step by kind of kernel: " + ", ".join(
            f"{kind} {ms:.1f} ({100 * ms / total:.0f}%)" for kind, ms in r["kernels"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klsweep.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="grpo", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before them (>= 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, a run's default: conf threads)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="N more steps under torch.profiler: time by kind of kernel")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. algo.group_size=16")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = measure(args.algo, args.steps, args.warmup, args.threads, args.overrides,
                     args.profile)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    sys.exit(main())
