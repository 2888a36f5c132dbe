"""The JSON record of a benchmark run: throughput over the whole loop's wall time, the step,
memory, the roofline, the breakdown by phase and, when profiled, by kind of kernel."""

from __future__ import annotations

import itertools
import os
import statistics
from collections import Counter
from typing import Any

import torch

from klsweep.bench.timing import PHASES
from klsweep.tasks.base import Task

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


LAGGED = ("perf/trainer_busy_s", "perf/trainer_idle_s", "perf/engine_busy_s",
          "perf/engine_idle_s")


def overlap(rows: list[dict], sampling_s: float) -> dict[str, float]:
    """Means a step of the seconds the engine generated (``generate_ms``) and the trainer
    waited for it (``wait_ms``), the engine's and the trainer's idle time, and the share of
    generation hidden behind training, 1 − wait/generate: 0 where the trainer samples itself
    (``rollout.lag`` = 0: every second of generation is a second of the step)."""
    if not rows or LAGGED[0] not in rows[0]:
        return {"generate_ms": 1000 * sampling_s, "wait_ms": 1000 * sampling_s,
                "engine_idle_ms": 0.0, "trainer_busy_ms": 0.0, "hidden": 0.0}
    mean = {key: statistics.mean(row[key] for row in rows) for key in LAGGED}
    generate, wait = mean["perf/engine_busy_s"], mean["perf/trainer_idle_s"]
    return {"generate_ms": 1000 * generate, "wait_ms": 1000 * wait,
            "engine_idle_ms": 1000 * mean["perf/engine_idle_s"],
            "trainer_busy_ms": 1000 * mean["perf/trainer_busy_s"],
            "hidden": max(0.0, 1.0 - wait / generate) if generate > 0 else 0.0}


def summarize(algo: str, cfg: Any, task: Task, rows: list[dict], ends: list[float],
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
        "model": cfg.model.get("name") or cfg.model.kind,
        "rollout": {"engine": cfg.rollout.engine, "lag": cfg.rollout.lag,
                    "engine_threads": cfg.rollout.threads},
        "shape": {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
                  "n_head": cfg.model.n_head, "vocab": task.vocab_size,
                  "prompt_len": task.prompt_len, "new_tokens": task.max_new_tokens},
        "tokens_per_step": tokens / n, "tokens_per_s": tokens / wall_s,
        "samples_per_s": sum(row["perf/samples"] for row in rows) / wall_s,
        "pairs_per_s": sum(row.get("dpo/pairs", 0.0) for row in rows) / wall_s,
        "step_ms": 1000 * step_s, "step_ms_median": 1000 * statistics.median(loop_s),
        "step_ms_inside": 1000 * statistics.median(row["perf/step_s"] for row in rows),
        "peak_memory_mib": peak_mib,
        "memory": "CUDA max allocated" if torch.cuda.is_available() else "max RSS",
        "gflop_per_step": flops / 1e9, "gflop_per_s": flops / step_s / 1e9,
        "roofline_ms": 1000 * roof_s,
        "roofline_gflop_per_s": flops / roof_s / 1e9 if roof_s else 0.0,
        "roofline_fraction": roof_s / step_s,
        "overlap": overlap(rows, phase_s["sampling"]),
        "phases": {p: {"ms": 1000 * phase_s[p], "share": phase_s[p] / step_s,
                       "gflop": roof.get(p, {}).get("flops", 0) / 1e9,
                       "roofline_ms": 1000 * roof.get(p, {}).get("roofline_s", 0.0)}
                   for p in PHASES},
    }
