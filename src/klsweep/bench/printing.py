"""The human-readable summary of a benchmark record."""

from __future__ import annotations

import os


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
