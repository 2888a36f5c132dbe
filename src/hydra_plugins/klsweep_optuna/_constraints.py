"""Sweep constraints (``hydra.sweeper.constraints: ["kl/final <= 0.05"]``): each reads a
number of the run's summary and bounds it. Optuna's convention: a constraint's value is
``metric - bound`` for ``<=`` and ``bound - metric`` for ``>=``, and a trial is feasible when
every value is <= 0. The values are set on the trial with ``Trial.set_constraint`` (Optuna 5
deprecates the samplers' ``constraints_func`` for it); they live in the trial's system
attributes in the storage, where TPE, NSGA-II and GP read them when they sample, where
``study.best_trial(s)`` skips the infeasible, and where a resumed study finds them again."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from klsweep.budget import Constraint

_CONSTRAINT = re.compile(r"^\s*(?P<metric>[^\s<>=]+)\s*(?P<op><=|>=)\s*(?P<bound>\S+)\s*$")


def parse_constraint(text: Any, known: Sequence[str]) -> Constraint:
    """``"metric <= number"`` or ``"metric >= number"``, metric a number of the summary."""
    where = f"hydra.sweeper.constraints: {text!r}"
    match = _CONSTRAINT.match(text) if isinstance(text, str) else None
    if match is None:
        raise SweepConfigError(f"{where} must read 'metric <= number' or 'metric >= number' "
                               f"(e.g. 'kl/final <= 0.05'; < and > alone are not allowed)")
    try:
        bound = float(match["bound"])
    except ValueError:
        bound = math.nan
    if not math.isfinite(bound):
        raise SweepConfigError(f"{where}: the bound {match['bound']!r} is not a finite number")
    if match["metric"] not in known:
        raise SweepConfigError(f"{where}: {match['metric']} is not a number of a run's "
                               f"summary (allowed: {', '.join(known)})")
    return Constraint(match["metric"], match["op"], bound)


def check_constraints(texts: Sequence[Any] | None, known: Sequence[str]) -> list[Constraint]:
    constraints = [parse_constraint(text, known) for text in texts or ()]
    names = [c.name for c in constraints]
    for name in names:
        if names.count(name) > 1:
            raise SweepConfigError(f"hydra.sweeper.constraints: {name!r} is given twice")
    return constraints


def violation(trial: FrozenTrial) -> float:
    """By how much a trial breaks its constraints in all (0: feasible), as Optuna's TPE
    scores infeasible trials; inf for a trial that has no constraint values."""
    if not trial.constraints:
        return math.inf
    return sum(max(0.0, value) for value in trial.constraints.values())


def is_feasible(trial: FrozenTrial) -> bool:
    return violation(trial) == 0.0
