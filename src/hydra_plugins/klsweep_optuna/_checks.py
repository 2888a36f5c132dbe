"""Checks of a sweep's settings against klsweep, before any trial runs: every searched key
exists, the run config is valid at both ends of every interval and at every choice, and every
objective names a number that a run's summary holds."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.object_type import ObjectType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from hydra_plugins.klsweep_optuna._search_space import (
    SearchSpace,
    corner_values,
    override_string,
)

DIRECTIONS = ("maximize", "minimize")
DEFAULT_OBJECTIVES = {"reward/final": "maximize"}
# the numbers klsweep.train.train puts in every summary beside the final metrics
RUN_NUMBERS = ("steps_done", "wall_time_s", "fit_time_s", "perf/tokens_per_s")


def _eval_k(config: DictConfig | None) -> list[int]:
    """The run's eval.k: the k of its pass@k metrics."""
    ks = OmegaConf.select(config, "eval.k") if config is not None else None
    return [int(k) for k in ks] if ks else []


def _exact_metrics(config: DictConfig | None) -> dict[str, float]:
    """The ``exact/*`` figures the exact task logs, of a two-completion toy policy."""
    import numpy as np

    from klsweep.exact_math import exact_metrics

    logp = np.log(np.full((1, 2), 0.5))
    metrics = exact_metrics(logp, logp, np.array([[0.0, 1.0]]), beta_seq=1.0)
    # logged beside them with a proxy reward (task.reward_source) or a moving reference,
    # and the exact pass@k of each k of eval.k
    return metrics | dict.fromkeys(("exact/gold_reward", "exact/proxy_reward",
                                    "exact/kl_to_init",
                                    *(f"exact/pass@{k}" for k in _eval_k(config))), 0.0)


def _evaluation_metrics(config: DictConfig | None) -> dict[str, float]:
    """The ``eval/*`` figures of a held-out evaluation (task=reasoning), the policy's and
    the reference's, asked of the function that computes them."""
    import numpy as np
    import torch

    from klsweep.tasks.evaluation import evaluation_metrics

    one = (np.zeros((1, 1)), np.zeros((1, 1)), torch.zeros(1), torch.ones(1, 1), [1])
    names = {**evaluation_metrics(*one), **evaluation_metrics(*one, prefix="eval/ref_")}
    return names | dict.fromkeys((f"eval/{p}pass@{k}" for p in ("", "ref_")
                                  for k in _eval_k(config)), 0.0)


# the metrics a task logs beside every run's, by task name, for the run's config
TASK_METRICS = {"exact": _exact_metrics, "reasoning": _evaluation_metrics}


def known_objectives(task: str | None = None, config: DictConfig | None = None) -> list[str]:
    """Every number a run's summary holds: the final metrics that ``summarize`` derives from
    the logged keys, ``task``'s own among them (asked of ``summarize`` and of the task's
    metric function themselves, so they never disagree; ``config``: the sweep's run config,
    whose eval.k names the pass@k metrics), and the run's own numbers."""
    from klsweep.records import FINAL_KEYS, summarize

    logged = {key: 0.0 for key in (*FINAL_KEYS, "kl/beta")}
    if task in TASK_METRICS:
        logged.update(TASK_METRICS[task](config))
    return sorted({*summarize([logged]), *RUN_NUMBERS})


def check_objectives(objectives: Mapping[str, Any], task: str | None = None,
                     config: DictConfig | None = None) -> dict[str, str]:
    """``{metric: direction}`` in order, without those set to null; none at all means
    reward/final, maximized."""
    chosen = {name: direction for name, direction in objectives.items()
              if direction is not None} or dict(DEFAULT_OBJECTIVES)
    known = known_objectives(task, config)
    for name, direction in chosen.items():
        if direction not in DIRECTIONS:
            raise SweepConfigError(f"hydra.sweeper.objectives.{name} must be maximize or "
                                   f"minimize (got {direction!r})")
        if name not in known:
            raise SweepConfigError(f"hydra.sweeper.objectives: {name} is not a number of a "
                                   f"run's summary with task={task} "
                                   f"(allowed: {', '.join(known)})")
    return chosen


def check_numbers(settings: DictConfig) -> None:
    """The sweeper's own counts and intervals."""
    for key, minimum, optional in (("n_trials", 1, False), ("n_jobs", 1, True),
                                   ("report_every", 1, False), ("max_failures", 1, True),
                                   ("heartbeat_interval", 1, False), ("grace_period", 1, False),
                                   ("max_retry", 0, False)):
        value = settings[key]
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SweepConfigError(f"hydra.sweeper.{key} must be an integer >= {minimum}"
                                   f"{' or null' if optional else ''} (got {value!r})")
    if settings.grace_period <= settings.heartbeat_interval:
        raise SweepConfigError(f"hydra.sweeper.grace_period must exceed "
                               f"hydra.sweeper.heartbeat_interval (got {settings.grace_period} "
                               f"<= {settings.heartbeat_interval})")


def check_params(space: SearchSpace, config: DictConfig, config_loader: Any) -> None:
    """Every searched key exists, and the run config composed with the fixed overrides is
    valid at each end of every searched range and at every choice (one key at a time)."""
    groups = {key for key in space.distributions if _is_group(key, config_loader)}
    for key in space.distributions:
        if key not in groups:
            _check_key(key, config)
    corners = [(key, value) for key, dist in space.distributions.items()
               for value in corner_values(dist)]
    if not corners:
        _check_run_config(config, space.fixed)
    for key, value in corners:
        searched = [*space.fixed, override_string(key, value)]
        if key in groups:  # another config file: Hydra composes it
            _check_run_config(_composed(searched, config, config_loader), searched)
        else:  # a value: set in the config composed with the fixed overrides, as Hydra would
            run_config = copy.deepcopy(config)
            OmegaConf.update(run_config, key, value, merge=True)
            _check_run_config(run_config, searched)


def _is_group(key: str, config_loader: Any) -> bool:
    return bool(config_loader.get_group_options(key, results_filter=ObjectType.CONFIG))


def _check_key(key: str, config: DictConfig) -> None:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    if isinstance(node, DictConfig) and leaf in node:
        return
    where = ""
    if isinstance(node, DictConfig):
        siblings = ", ".join(str(k) for k in node if parent or k != "hydra")
        where = f" (allowed under {parent or 'the root'}: {siblings})"
    raise SweepConfigError(f"searched key {key} is not a known key{where}")


def _composed(overrides: Sequence[str], config: DictConfig, config_loader: Any) -> DictConfig:
    try:
        return config_loader.load_sweep_config(master_config=config,
                                               sweep_overrides=list(overrides))
    except HydraException as err:
        raise SweepConfigError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}") from None


def _check_run_config(run_config: DictConfig, overrides: Sequence[str]) -> None:
    from klsweep.config import ConfigError, validate

    run_config = copy.copy(run_config)
    with open_dict(run_config):
        del run_config["hydra"]  # the job's runtime fields are filled only when it starts
    try:
        validate(run_config)
    except ConfigError as err:
        raise SweepConfigError(f"{err} (with {' '.join(overrides) or 'the fixed overrides'})"
                               ) from None


def finite_values(summary: Mapping[str, Any], objectives: Sequence[str]
                  ) -> tuple[list[float] | None, str | None]:
    """The objectives' values in a run's summary, or the reason they cannot be told."""
    values = []
    for name in objectives:
        value = summary.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, f"objective {name} is {value!r} in the run's summary"
        values.append(float(value))
    return values, None
