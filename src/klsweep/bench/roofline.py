"""The machine's rate on the step's own shapes: each distinct GEMM the step counted is timed
alone, with the run's thread count. Their sum is the step's roofline: the time it would take
doing nothing but its matrix products at this machine's measured rate."""

from __future__ import annotations

import statistics
import time

import torch

from klsweep.bench.flops import Gemm, PhaseFlops


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
