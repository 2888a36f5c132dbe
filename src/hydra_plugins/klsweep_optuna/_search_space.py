"""Search spaces written in Hydra's override grammar, turned into Optuna distributions.

``interval(a, b)`` -> FloatDistribution, ``int(interval(a, b))`` -> IntDistribution,
``tag(log, ...)`` -> the same on a log scale, ``range(a, b, step)`` -> a stepped distribution
over the values Hydra's range yields (``b`` excluded, as in Python), ``choice(x, y)`` or
``x,y`` -> CategoricalDistribution. A plain value is not searched: every trial gets it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import OverrideParseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from klsweep.swept import flatten_params


@dataclass(frozen=True)
class SearchSpace:
    distributions: dict[str, BaseDistribution]  # config key -> what the sampler draws from
    fixed: list[str]  # overrides every trial gets, as key=value strings


def parse_search_space(params: Mapping[str, Any], arguments: Sequence[str],
                       parser: OverridesParser) -> SearchSpace:
    """The search space of ``hydra.sweeper.params`` and the command line: a sweep value on
    the command line (``kl.beta='interval(0.01, 0.1)'``) adds or replaces a param, a plain
    value there fixes the key for every trial."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for key, value in flatten_params(params):
        source = f"hydra.sweeper.params.{key}"
        if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
            fixed[key] = override_string(key, value)
            continue
        if not isinstance(value, str):
            raise SweepConfigError(f"{source} must be a search space in Hydra's override "
                                   f"grammar, such as interval(0.01, 0.5) or choice(a, b) "
                                   f"(got {value!r})")
        override = _parse(parser, f"{key}={value}", source)
        if override.is_sweep_override():
            distributions[key] = to_distribution(override, source)
        else:
            fixed[key] = override.input_line
    for line in arguments:
        override = _parse(parser, line, line)
        key = override.key_or_group
        if override.is_sweep_override():
            if override.is_add() or override.is_delete():
                raise SweepConfigError(f"{line}: a searched key must already exist in the "
                                       f"config (no + or ~ prefix)")
            fixed.pop(key, None)
            distributions[key] = to_distribution(override, line)
        else:
            distributions.pop(key, None)
            fixed[key] = override.input_line
    return SearchSpace(distributions, list(fixed.values()))


def _parse(parser: OverridesParser, line: str, source: str) -> Override:
    try:
        return parser.parse_overrides([line])[0]
    except OverrideParseException as err:
        # Hydra's message wraps the reason between a header and a link to its docs
        reasons = [text for text in str(err).splitlines()
                   if text and not text.startswith(("Error parsing override", "See "))]
        raise SweepConfigError(f"{source}: cannot parse {line!r}: "
                               f"{reasons[0] if reasons else err}") from None


def to_distribution(override: Override, source: str) -> BaseDistribution:
    """The Optuna distribution of one sweep override (``source`` names it in errors)."""
    sweep = override.value()
    text = override.input_line.partition("=")[2]
    tags = set(sweep.tags)
    if tags - {"log"} or (tags and not isinstance(sweep, IntervalSweep)):
        raise SweepConfigError(f"{source}: {text}: the only tag is log, on an interval")
    if getattr(sweep, "shuffle", False):
        raise SweepConfigError(f"{source}: {text}: shuffle has no meaning here "
                               f"(the sampler picks the order)")
    if isinstance(sweep, IntervalSweep):
        return _interval(sweep, "log" in tags, text, source)
    if isinstance(sweep, RangeSweep):
        return _range(sweep, text, source)
    if isinstance(sweep, ChoiceSweep):
        return _choice(sweep, text, source)
    raise SweepConfigError(f"{source}: {text} is not a search space "
                           f"(use interval, range or choice)")


def _interval(sweep: IntervalSweep, log: bool, text: str, source: str) -> BaseDistribution:
    low, high = sweep.start, sweep.end
    if not low < high:
        raise SweepConfigError(f"{source}: {text} is empty (the low end must be below the "
                               f"high end)")
    if log and low <= 0:
        raise SweepConfigError(f"{source}: {text} on a log scale must be above 0 "
                               f"(got low end {low})")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _range(sweep: RangeSweep, text: str, source: str) -> BaseDistribution:
    values = list(sweep.range())
    if not values:
        raise SweepConfigError(f"{source}: {text} is empty (it yields no value)")
    low, high, step = min(values), max(values), abs(sweep.step)
    if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
        return IntDistribution(int(low), int(high), step=int(step))
    return FloatDistribution(float(low), float(high), step=float(step))


def _choice(sweep: ChoiceSweep, text: str, source: str) -> BaseDistribution:
    choices = list(sweep.list)
    for value in choices:
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise SweepConfigError(f"{source}: {text}: choices must be plain values "
                                   f"(got {value!r})")
    if len(set(map(repr, choices))) != len(choices):
        raise SweepConfigError(f"{source}: {text} repeats a choice")
    return CategoricalDistribution(choices)


def corner_values(distribution: BaseDistribution) -> list[Any]:
    """The values that bound a distribution: both ends, or every choice. A config that is
    valid at these is checked before any trial runs."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    assert isinstance(distribution, (IntDistribution, FloatDistribution))
    return [distribution.low, distribution.high]  # Optuna moves high onto the step grid


def grid_values(key: str, distribution: BaseDistribution) -> list[Any]:
    """Every value of a discrete distribution, for the grid sampler."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        n = round((distribution.high - distribution.low) / distribution.step) + 1
        # rounded, so that 0.1 + 2 * 0.1 is the 0.3 a user wrote
        return [round(distribution.low + i * distribution.step, 12) for i in range(n)]
    raise SweepConfigError(f"hydra.sweeper.params.{key}: sampler grid needs a choice or a "
                           f"range (got {distribution})")


_BARE = re.compile(r"[A-Za-z_/][A-Za-z0-9_./:-]*")
_RESERVED = {"true", "false", "null", "inf", "nan"}


def override_string(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar, parsing back to exactly ``value``."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)
    elif _BARE.fullmatch(value) and value.lower() not in _RESERVED:
        text = value
    else:
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"
