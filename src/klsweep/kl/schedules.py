"""β schedules: how the KL coefficient moves during training.

Each schedule is a small deterministic object. ``update(kl, n_samples)`` is called once per
update with the measured KL (in the unit of ``target``) and the number of samples it was
measured on, and returns the new β, clamped to ``[beta_min, beta_max]``. Time-based schedules
count the calls. ``state_dict``/``load_state_dict`` make a resumed run continue exactly.
"""

from __future__ import annotations

import inspect
import math
from typing import Any


class Schedule:
    """Base class: holds β, its bounds and the update count."""

    name = "base"
    needs_target = False

    def __init__(self, beta: float, *, beta_min: float = 0.0, beta_max: float = math.inf) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (got {beta})")
        if not beta_min <= beta_max:
            raise ValueError(f"beta_min must be <= beta_max (got {beta_min} > {beta_max})")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.beta = self._clamp(float(beta))
        self.steps_done = 0

    def _clamp(self, beta: float) -> float:
        return min(max(beta, self.beta_min), self.beta_max)

    def update(self, kl: float, n_samples: int) -> float:
        self.steps_done += 1
        self.beta = self._clamp(self._next_beta(float(kl), int(n_samples)))
        return self.beta

    def _next_beta(self, kl: float, n_samples: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class TargetSchedule(Schedule):
    """A schedule that steers the measured KL toward ``target``."""

    needs_target = True

    def __init__(self, beta: float, target: float, **bounds: float) -> None:
        if not target > 0:
            raise ValueError(f"target must be > 0 (got {target})")
        super().__init__(beta, **bounds)
        self.target = float(target)


class FixedSchedule(Schedule):
    """β stays where it started."""

    name = "fixed"

    def _next_beta(self, kl: float, n_samples: int) -> float:
        return self.beta


class AdaptiveSchedule(TargetSchedule):
    """Ziegler et al. (2019): proportional control of β toward a target KL,
    ``e = clip(KL/target - 1, ±clip)``, ``β ← β·(1 + e·n_samples/horizon)``."""

    name = "adaptive"

    def __init__(self, beta: float, target: float, horizon: float = 10000,
                 clip: float = 0.2, **bounds: float) -> None:
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0 (got {horizon})")
        super().__init__(beta, target, **bounds)
        self.horizon = float(horizon)
        self.clip = float(clip)

    def _next_beta(self, kl: float, n_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -self.clip), self.clip)
        return self.beta * (1.0 + error * n_samples / self.horizon)


class MultiplicativeSchedule(TargetSchedule):
    """Step β up when KL is well above target and down when well below (the rule of
    Schulman et al. 2017, §4, with gentler factors by default)."""

    name = "multiplicative"

    def __init__(self, beta: float, target: float, increase: float = 1.1, decrease: float = 0.9,
                 high: float = 1.5, low: float = 0.5, **bounds: float) -> None:
        super().__init__(beta, target, **bounds)
        self.increase, self.decrease = float(increase), float(decrease)
        self.high, self.low = float(high), float(low)

    def _next_beta(self, kl: float, n_samples: int) -> float:
        if kl > self.high * self.target:
            return self.beta * self.increase
        if kl < self.low * self.target:
            return self.beta * self.decrease
        return self.beta


class _TimeSchedule(Schedule):
    """β goes from ``beta`` to ``beta_end`` over ``steps`` updates, then stays."""

    def __init__(self, beta: float, beta_end: float = 0.0, steps: int = 1000,
                 **bounds: float) -> None:
        if steps <= 0:
            raise ValueError(f"steps must be > 0 (got {steps})")
        if beta_end < 0:
            raise ValueError(f"beta_end must be >= 0 (got {beta_end})")
        super().__init__(beta, **bounds)
        self.beta_start = float(beta)
        self.beta_end = float(beta_end)
        self.steps = int(steps)

    def _next_beta(self, kl: float, n_samples: int) -> float:
        return self._at(min(self.steps_done / self.steps, 1.0))

    def _at(self, progress: float) -> float:
        raise NotImplementedError


class LinearSchedule(_TimeSchedule):
    name = "linear"

    def _at(self, progress: float) -> float:
        return self.beta_start + (self.beta_end - self.beta_start) * progress


class CosineSchedule(_TimeSchedule):
    name = "cosine"

    def _at(self, progress: float) -> float:
        weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.beta_end + (self.beta_start - self.beta_end) * weight


class ExponentialSchedule(_TimeSchedule):
    """Geometric interpolation, ``β_t = β_0·(β_end/β_0)^(t/steps)``: equal ratios per step."""

    name = "exponential"

    def __init__(self, beta: float, beta_end: float = 0.0, steps: int = 1000,
                 **bounds: float) -> None:
        if beta <= 0 or beta_end <= 0:
            raise ValueError(f"exponential schedule needs beta > 0 and beta_end > 0 "
                             f"(got beta={beta}, beta_end={beta_end})")
        super().__init__(beta, beta_end, steps, **bounds)

    def _at(self, progress: float) -> float:
        return self.beta_start * (self.beta_end / self.beta_start) ** progress


class PIDSchedule(TargetSchedule):
    """PID control of the relative error ``e = (KL - target)/target`` in log β:
    ``log β = log β_0 + kp·e + ki·Σe + kd·(e - e_prev)``. Acting on log β keeps β positive and
    makes the gains independent of β's scale. Anti-windup: the integral is clipped to
    ±``windup`` and stops growing while β is pinned at a bound in the error's direction."""

    name = "pid"

    def __init__(self, beta: float, target: float, kp: float = 0.5, ki: float = 0.05,
                 kd: float = 0.0, windup: float = 20.0, **bounds: float) -> None:
        if beta <= 0:
            raise ValueError(f"pid schedule needs beta > 0 (got {beta})")
        super().__init__(beta, target, **bounds)
        self.beta_start = float(beta)
        self.kp, self.ki, self.kd, self.windup = float(kp), float(ki), float(kd), float(windup)
        self.integral = 0.0
        self.prev_error: float | None = None

    def _next_beta(self, kl: float, n_samples: int) -> float:
        error = (kl - self.target) / self.target
        pinned = (self.beta >= self.beta_max and error > 0) or (
            self.beta <= self.beta_min and error < 0)
        if not pinned:
            self.integral = min(max(self.integral + error, -self.windup), self.windup)
        derivative = 0.0 if self.prev_error is None else error - self.prev_error
        self.prev_error = error
        log_beta = (math.log(self.beta_start) + self.kp * error + self.ki * self.integral
                    + self.kd * derivative)
        return math.exp(min(log_beta, 700.0))


class DualSchedule(TargetSchedule):
    """Lagrangian dual ascent on the constraint KL ≤ target:
    ``β ← max(0, β + lr·(KL - target))``."""

    name = "dual"

    def __init__(self, beta: float, target: float, lr: float = 1.0, **bounds: float) -> None:
        super().__init__(beta, target, **bounds)
        self.lr = float(lr)

    def _next_beta(self, kl: float, n_samples: int) -> float:
        return max(0.0, self.beta + self.lr * (kl - self.target))


_CLASSES = (FixedSchedule, AdaptiveSchedule, MultiplicativeSchedule, LinearSchedule,
            CosineSchedule, ExponentialSchedule, PIDSchedule, DualSchedule)
SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in _CLASSES}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name: ``make_schedule("adaptive", beta=0.1, target=0.05)``.
    Arguments that only other schedules take (``target`` for ``fixed``, say) are ignored, so
    one config can feed every schedule; an argument no schedule takes is an error."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} (allowed: {', '.join(SCHEDULES)})")
    known = set().union(*(_accepted_arguments(cls) for cls in SCHEDULES.values()))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown schedule argument(s) {', '.join(unknown)} "
                        f"(allowed: {', '.join(sorted(known))})")
    accepted = _accepted_arguments(SCHEDULES[name])
    return SCHEDULES[name](**{k: v for k, v in kwargs.items() if k in accepted})


def _accepted_arguments(cls: type[Schedule]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters
            # object.__init__'s *args and **kwargs are no options
            names |= {p for p, v in params.items()
                      if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return (names - {"self"}) | {"beta_min", "beta_max"}
