"""``python -m klsweep.bench --lag 0 1 2``: the training loop's throughput with the rollout of
each step sampled ``rollout.lag`` steps ahead, side by side with the synchronous loop.

Each measurement runs in a process of its own (``python -m klsweep.bench --json`` with the
lag's overrides), the lags in turn and their order reversed from round to round, as
``klsweep.bench.engines`` measures the engines: in one process vLLM's CPU worker binds the
OpenMP threads, and a measurement must not run on another's binding. The trainer runs on
``--threads`` threads and, at a lag, the engine process on ``rollout.threads`` (default 1):
on 2 cores, one each. The synchronous loop is measured on the trainer's threads and, with
``--sync-threads``, on that many too (both cores for the one process that does everything).

Recorded per measurement: generated tokens/s over the measured steps' wall time, the step,
the seconds a step the engine generated and the trainer waited for it, the share of
generation hidden behind training (1 − wait/generate), the machine's 1-minute load average
before it and the CPU seconds its processes used per wall second (a share of the cores well
below what they should get, or a load above the cores, says the figure is not this
machine's).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def order(items: list[Any], round_index: int) -> list[Any]:
    """The measurements of one round: as given, then reversed, alternately."""
    return items if round_index % 2 == 0 else items[::-1]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_once(args: list[str], threads: int, lag: int) -> dict[str, Any]:
    """One measurement: ``python -m klsweep.bench --json`` at ``lag`` in a fresh process."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if lag == 0:  # vLLM in the trainer's process binds its threads to the trainer's cores
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    load, cpu, wall = os.getloadavg()[0], _children_cpu_s(), time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "klsweep.bench", "--json", "--no-roofline",
                             "--threads", str(threads), *args, f"rollout.lag={lag}"],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the lag {lag} measurement failed: {tail}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["load_before"] = load
    record["cpu_per_s"] = (_children_cpu_s() - cpu) / (time.perf_counter() - wall)
    return record


def compare(lags: list[int], *, rounds: int, threads: int, sync_threads: int | None,
            args: list[str]) -> dict[str, Any]:
    """Every lag (and the synchronous loop on ``sync_threads``) ``rounds`` times; each
    measurement's figures and their medians."""
    runs: list[tuple[str, int, int]] = [(f"lag {lag}", lag, threads) for lag in lags]
    if sync_threads is not None:
        runs.insert(1, (f"lag 0, {sync_threads} threads", 0, sync_threads))
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in runs}
    for r in range(rounds):
        for name, lag, n in order(runs, r):
            measured[name].append(measure_once(args, n, lag))
    rows = {}
    for name, records in measured.items():
        def median(get: Any, records: list = records) -> float:
            return statistics.median(get(rec) for rec in records)

        rows[name] = {
            "tokens_per_s": median(lambda r: r["tokens_per_s"]),
            "step_ms": median(lambda r: r["step_ms"]),
            "generate_ms": median(lambda r: r["overlap"]["generate_ms"]),
            "wait_ms": median(lambda r: r["overlap"]["wait_ms"]),
            "hidden": median(lambda r: r["overlap"]["hidden"]),
            "load_before": [r["load_before"] for r in records],
            "cpu_per_s": [r["cpu_per_s"] for r in records]}
    first = measured[runs[0][0]][0]
    return {"model": first["model"], "engine": first["rollout"]["engine"],
            "shape": first["shape"], "tokens_per_step": first["tokens_per_step"],
            "threads": threads, "cores": os.cpu_count(), "rounds": rounds, "rows": rows,
            "runs": measured}


def table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table, the synchronous loop's row first."""
    base = next(iter(result["rows"].values()))["tokens_per_s"]
    lines = [f"{result['model']} through {result['engine']}, "
             f"{result['tokens_per_step']:.0f} generated tokens a step, trainer on "
             f"{result['threads']} thread(s), medians of {result['rounds']} rounds",
             "", "| loop | tokens/s | vs lag 0 | step ms | generate ms | wait ms | hidden | "
             "load before | CPU s/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        loads = ", ".join(f"{v:.1f}" for v in row["load_before"])
        cpu = ", ".join(f"{v:.2f}" for v in row["cpu_per_s"])
        lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | "
                     f"{row['tokens_per_s'] / base:.2f}× | {row['step_ms']:.1f} | "
                     f"{row['generate_ms']:.1f} | {row['wait_ms']:.1f} | "
                     f"{100 * row['hidden']:.0f}% | {loads} | {cpu} |")
    return "\n".join(lines)
