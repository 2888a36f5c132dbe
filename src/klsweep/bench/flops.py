"""What a step computes: ``FlopCounterMode`` sees every matrix product (the linear layers
forward and backward, attention) and the phase it ran in; each is recorded as the GEMM
shapes it does, so that the roofline can time them."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from klsweep.bench.timing import PhaseClock

aten = torch.ops.aten
Gemm = tuple[int, int, int, int]  # (batch, M, K, N): a [batch, M, K] × [batch, K, N] product


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
