"""The Optuna side of a sweep: the storage with its heartbeat, the sampler, the study, and
the counts that decide how many more trials to ask for."""

from __future__ import annotations

import inspect
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.samplers import (
    BaseSampler,
    CmaEsSampler,
    GPSampler,
    GridSampler,
    NSGAIISampler,
    RandomSampler,
    TPESampler,
)
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from hydra_plugins.klsweep_optuna._search_space import grid_values
from klsweep.pruning import PRUNERS, make_pruner
from klsweep.storage import engine_kwargs


class _SweepGridSampler(GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` once every point is done: stop()
    works only inside ``study.optimize``, and the sweep loop ends a finished grid itself."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: TrialState, values: Sequence[float] | None) -> None:
        pass


SAMPLERS: dict[str, type[BaseSampler]] = {
    "tpe": TPESampler, "random": RandomSampler, "nsgaii": NSGAIISampler, "gp": GPSampler,
    "cmaes": CmaEsSampler, "grid": _SweepGridSampler,
}
# samplers that cannot rank trials by several objectives
_SINGLE_OBJECTIVE_SAMPLERS = {"cmaes"}
# trials that count toward n_trials, and those that may still become one
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
_CREATE_RETRIES = 2


def check_options(kind: str, spec: Mapping[str, Any], registry: Mapping[str, type],
                  reserved: Sequence[str] = ()) -> dict[str, Any]:
    """The constructor arguments in ``hydra.sweeper.<kind>`` (every key but ``name``),
    checked against the chosen class's signature."""
    name = spec.get("name")
    if name not in registry:
        raise SweepConfigError(f"hydra.sweeper.{kind}.name must be one of "
                               f"{', '.join(registry)} (got {name!r})")
    accepted = set(inspect.signature(registry[name].__init__).parameters) - {"self"}
    accepted -= set(reserved)
    options = {key: value for key, value in spec.items() if key != "name"}
    for key in options:
        if key not in accepted:
            raise SweepConfigError(f"hydra.sweeper.{kind}.{key} is not an option of "
                                   f"{kind}={name} (allowed: {', '.join(sorted(accepted))})")
    return options


def make_sampler(spec: Mapping[str, Any], distributions: Mapping[str, BaseDistribution],
                 n_objectives: int) -> BaseSampler:
    """The sampler ``hydra.sweeper.sampler`` names, with its options."""
    options = check_options("sampler", spec, SAMPLERS, reserved=("search_space",))
    name = spec["name"]
    if name in _SINGLE_OBJECTIVE_SAMPLERS and n_objectives > 1:
        raise SweepConfigError(f"hydra.sweeper.sampler.name={name} optimises one objective "
                               f"(got {n_objectives}; use tpe, nsgaii, gp or random)")
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  (CmaEsSampler needs it; optuna does not install it)
        except ImportError:
            raise SweepConfigError("hydra.sweeper.sampler.name=cmaes needs the cmaes "
                                   "package (pip install cmaes)") from None
    if name == "grid":
        options["search_space"] = grid_space(distributions)
    try:
        with warnings.catch_warnings():
            # gp and a few options are marked experimental; the choice was the user's
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SAMPLERS[name](**options)
    except (TypeError, ValueError) as err:
        raise SweepConfigError(f"hydra.sweeper.sampler ({name}): {err}") from None


def grid_space(distributions: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    return {key: grid_values(key, dist) for key, dist in distributions.items()}


def check_pruner(spec: Mapping[str, Any], n_objectives: int) -> dict[str, Any]:
    """``hydra.sweeper.pruner`` as the runs will rebuild it from the study."""
    check_options("pruner", spec, PRUNERS)
    if spec["name"] != "none" and n_objectives > 1:
        raise SweepConfigError(f"hydra.sweeper.pruner.name={spec['name']} needs a single "
                               f"objective (Optuna prunes by one value; got {n_objectives})")
    try:
        make_pruner(spec)
    except (TypeError, ValueError) as err:
        raise SweepConfigError(f"hydra.sweeper.pruner ({spec['name']}): {err}") from None
    return dict(spec)


def make_storage(url: str, *, heartbeat_interval: int, grace_period: int,
                 max_retry: int) -> optuna.storages.RDBStorage:
    """An RDB storage whose RUNNING trials go stale after ``grace_period`` seconds without a
    heartbeat; a stale trial is failed and queued again with the same params."""
    def connect() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            # heartbeats are marked experimental in Optuna; they find the stale trials
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retry),
                engine_kwargs=engine_kwargs(url))

    for attempt in range(_CREATE_RETRIES):
        try:
            return connect()
        except sqlalchemy.exc.DBAPIError as err:
            if not lost_creation_race(err):
                raise
            # workers that start at once on a fresh database race to create Optuna's tables;
            # the loser finds them made on its next try
            time.sleep(1.0 + attempt)
    return connect()


def lost_creation_race(err: sqlalchemy.exc.DBAPIError) -> bool:
    """Whether ``err`` says another worker created a table or row first: PostgreSQL raises
    ProgrammingError ("relation already exists") or IntegrityError (a duplicate key),
    SQLite an OperationalError ("table studies already exists")."""
    if isinstance(err, (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError)):
        return True
    return isinstance(err, sqlalchemy.exc.OperationalError) and "already exists" in str(err)


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def count(study: optuna.Study, states: Sequence[TrialState]) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether trial ``number`` is beyond ``n_trials``: workers sharing a study may ask at
    the same moment; the lower numbers win, so every worker reaches the same verdict."""
    ahead = [t for t in study.get_trials(deepcopy=False, states=CLAIMED) if t.number < number]
    return len(ahead) >= n_trials


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number)


# Held while a heartbeat is written. A fork (klsweep_local starts its jobs so, while the
# heartbeat thread runs) waits for it: a child must not inherit the database driver's or the
# connection pool's locks taken mid-write, which nothing in the child would release.
_RECORDING = threading.Lock()
os.register_at_fork(before=_RECORDING.acquire, after_in_parent=_RECORDING.release,
                    after_in_child=_RECORDING.release)


class Heartbeat:
    """Records the heartbeat of the given trials every ``interval`` seconds while a batch
    runs, so that another worker can tell them from the trials of a killed one."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_ids: Sequence[int],
                 interval: float) -> None:
        self.storage, self.trial_ids, self.interval = storage, list(trial_ids), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="klsweep-heartbeat")

    def _beat(self) -> None:
        while True:
            with _RECORDING:
                for trial_id in self.trial_ids:
                    self.storage.record_heartbeat(trial_id)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
