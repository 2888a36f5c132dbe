"""Where a step's wall time goes: named phases that nest, and the seams of the policy pair
and the module that the benchmark times (the hot path carries no timing code)."""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L

PHASES = ("sampling", "reference", "policy.forward", "policy.backward", "optimiser", "other")


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
             (pair, "policy_logprobs_and_features"): "policy.forward",
             (module, "manual_backward"): "policy.backward",
             (module, "clip_gradients"): "optimiser"}
    for (owner, attr), name in seams.items():
        setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr in seams:
            delattr(owner, attr)  # the class's method shows through again
