"""How well a run's KL followed its target: pure functions of one run's trajectory, and
their mean ± std over seeds.

Every function takes plain sequences (the ``step``, ``kl/…`` and ``kl/beta`` columns of
metrics.jsonl) so that the trainer, the report and the tests compute the same numbers.
The KL is in the unit of ``kl.target`` (``kl/mean`` per token, or ``kl/seq`` for
``kl.unit=sequence``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# A KL within ±20% of its target counts as on target (the definition).
TOLERANCE = 0.2
# The per-step KL is measured on one batch (64 completions by default), whose noise alone can
# leave the ±20% band; "stays within" is judged on a trailing mean over this many steps.
SMOOTHING_WINDOW = 10

_ROUNDING = 1e-12

TRACKING_KEYS = ("tracking/steps_to_target", "tracking/overshoot", "tracking/error",
                 "tracking/beta_volatility")


def trailing_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of each value and the ``window − 1`` before it (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    x = np.asarray(values, dtype=float)
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def steps_to_target(steps: Sequence[float], kl: Sequence[float], target: float,
                    tolerance: float = TOLERANCE) -> float:
    """The first step from which KL stays within ``target·(1 ± tolerance)`` to the end of the
    run; NaN if the last value is outside the band (the run never settled)."""
    inside = np.abs(np.asarray(kl, dtype=float) - target) <= tolerance * target
    if len(inside) == 0 or not inside[-1]:
        return math.nan
    outside = np.flatnonzero(~inside)
    first = 0 if len(outside) == 0 else int(outside[-1]) + 1
    return float(steps[first])


def overshoot(kl: Sequence[float], target: float) -> float:
    """Largest KL over the target: 1 means the run never went above it."""
    return float(np.max(np.asarray(kl, dtype=float))) / target if len(kl) else math.nan


def tracking_error(kl: Sequence[float], target: float) -> float:
    """Mean of |KL − target| / target over the second half of the run, once the
    schedule has had time to act."""
    x = np.asarray(kl, dtype=float)
    if len(x) == 0:
        return math.nan
    second_half = x[len(x) // 2:]
    return float(np.mean(np.abs(second_half - target))) / target


def beta_volatility(beta: Sequence[float]) -> float:
    """Standard deviation of β's step-to-step changes, relative to mean β: 0 for a β that
    stays or moves on a straight line, large for a β that jumps back and forth. Relative,
    so that runs starting from different β compare."""
    b = np.asarray(beta, dtype=float)
    if len(b) < 3:
        return 0.0
    scale = float(np.mean(np.abs(b)))
    volatility = float(np.std(np.diff(b))) / scale if scale > 0 else 0.0
    # a straight line's steps differ only by float rounding (~1e-16 relative): that is 0
    return volatility if volatility > _ROUNDING else 0.0


def run_tracking(rows: Iterable[Mapping[str, float]], target: float, kl_key: str = "kl/mean",
                 window: int = SMOOTHING_WINDOW) -> dict[str, float]:
    """The tracking metrics of one run from its metrics rows (those that carry ``kl_key``).

    ``steps_to_target`` and ``overshoot`` use the trailing mean over ``window`` steps, so that
    one noisy batch neither delays settling nor counts as an overshoot; the tracking error
    averages over many steps already and uses the raw values."""
    rows = list(rows)
    measured = [row for row in rows if kl_key in row]
    steps = [row.get("step", i) for i, row in enumerate(measured)]
    kl = [row[kl_key] for row in measured]
    smooth = trailing_mean(kl, window) if kl else np.asarray([])
    betas = [row["kl/beta"] for row in rows if "kl/beta" in row]
    return {
        "tracking/steps_to_target": steps_to_target(steps, smooth, target),
        "tracking/overshoot": overshoot(smooth, target),
        "tracking/error": tracking_error(kl, target),
        "tracking/beta_volatility": beta_volatility(betas),
    }


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count over the
    finite values; NaN mean with count 0 when there are none."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0, len(x)
