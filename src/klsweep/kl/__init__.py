"""The KL math of klsweep, usable on its own in any trainer (DESIGN §10)."""

from klsweep.kl.divergences import DIVERGENCES, Divergence, make_divergence
from klsweep.kl.estimators import (
    ESTIMATORS,
    full_kl,
    kl_estimates,
    kl_metrics,
    kl_penalty_per_token,
    kl_per_token,
    masked_mean,
    masked_sum,
)
from klsweep.kl.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "ESTIMATORS",
    "SCHEDULES",
    "Schedule",
    "full_kl",
    "kl_estimates",
    "kl_metrics",
    "kl_penalty_per_token",
    "kl_per_token",
    "make_divergence",
    "make_schedule",
    "masked_mean",
    "masked_sum",
]
