"""KL budgets of a sweep: a constraint on a number of the run's summary (``kl/final <= 0.05``)
and when a running trial has broken one for good, so that it may be pruned.

``X/final`` is the mean of ``X/mean`` over the last quarter of the run's steps (``summarize``),
so at step ``t`` of ``T`` the final value is partly known: the window is the last
``w = ceil(T/4)`` steps, and the steps of it already logged are fixed.

* A feedback schedule (adaptive, multiplicative, PID, dual) raises β while the KL is over its
  target and may still pull the KL down, so its trial is pruned only when the bound is broken
  *whatever the remaining steps log*: the window's logged values alone, with every remaining
  one at its least possible value 0 (a KL is >= 0), already average over the bound.
* An open-loop schedule (fixed β, or β a function of the step: linear, cosine, exponential)
  does not react to the KL, whose level it sets; once ``min_progress`` of the steps ran, a
  running last-quarter mean over the bound by more than ``margin`` (relative) is taken as the
  level the run ends at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from klsweep.records import FINAL_FRACTION, FINAL_KEYS, final_mean


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``; its value in Optuna's convention is > 0 when broken."""

    metric: str
    op: str  # "<=" or ">="
    bound: float

    @property
    def name(self) -> str:
        """The key its value is stored under in a trial (``constraints:<name>``)."""
        return f"{self.metric} {self.op} {self.bound:g}"

    def value(self, metric: float) -> float:
        return metric - self.bound if self.op == "<=" else self.bound - metric


def constraint_values(constraints: Sequence[Constraint], summary: Mapping[str, Any]
                      ) -> tuple[dict[str, float] | None, str | None]:
    """``{name: value}`` from a (running) summary, or the reason a value cannot be told."""
    values = {}
    for constraint in constraints:
        metric = summary.get(constraint.metric)
        if not isinstance(metric, (int, float)) or not math.isfinite(metric):
            return None, (f"constraint {constraint.name}: {constraint.metric} is {metric!r} "
                          f"in the run's summary")
        values[constraint.name] = constraint.value(float(metric))
    return values, None


def logged_key(metric: str) -> str | None:
    """The logged key whose last-quarter mean the summary's KL ``metric`` is (``kl/final``
    from ``kl/mean``, ``kl/seq_final`` from ``kl/seq``), or None for another metric."""
    if not metric.startswith("kl/"):
        return None
    key = "kl/mean" if metric == "kl/final" else metric.removesuffix("_final")
    return key if key in FINAL_KEYS and key != metric else None


def budget_breach(values: Sequence[float], total_steps: int, bound: float, *, feedback: bool,
                  margin: float | None, min_progress: float,
                  fraction: float = FINAL_FRACTION) -> str | None:
    """Why a run whose KL logged ``values`` (one per step so far, of ``total_steps``) will end
    with a last-quarter mean over ``bound`` (see the module's doc), or None if it still may
    not."""
    done = len(values)
    if done >= total_steps:  # the run is over: nothing left to save, it ends as infeasible
        return None
    window = max(1, math.ceil(total_steps * fraction))
    logged = values[total_steps - window:]
    if logged and sum(logged) / window > bound:
        return (f"over the KL budget {bound:g} whatever the rest of the run logs: the "
                f"{len(logged)} of {window} last-quarter steps done average "
                f"{sum(logged) / len(logged):.4g}, already {sum(logged) / window:.4g} "
                f"over the whole window")
    if feedback or margin is None or done < min_progress * total_steps:
        return None
    running = final_mean([{"kl": v} for v in values], "kl", fraction)
    if running > bound * (1.0 + margin):
        return (f"over the KL budget {bound:g} by more than {margin:.0%} with an open-loop "
                f"β: last-quarter mean {running:.4g} after {done} of {total_steps} steps")
    return None
