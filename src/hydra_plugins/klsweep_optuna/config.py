"""The schema of ``hydra.sweeper`` for ``hydra/sweeper: klsweep_optuna``."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class KLSweepOptunaConf:
    _target_: str = "hydra_plugins.klsweep_optuna.klsweep_optuna_sweeper.KLSweepOptunaSweeper"
    # metric name (a key of the run's summary) -> maximize | minimize; several: a Pareto front.
    # Empty: reward/final, maximized. null drops an objective a preset set: the command line
    # merges mappings, so 'hydra.sweeper.objectives={kl/final:null}' leaves reward/final alone.
    objectives: dict[str, str | None] = field(default_factory=dict)
    # config key -> search space in Hydra's override grammar: interval(a, b),
    # tag(log, interval(a, b)), int(interval(a, b)), range(a, b, step), choice(x, y), x,y
    params: dict[str, Any] = field(default_factory=dict)
    # COMPLETE or PRUNED trials the study ends with (a resumed study counts its old ones)
    n_trials: int = 20
    # trials asked and launched per batch (joblib, klsweep_local and submitit run a batch at
    # once); null: as many as the launcher runs at once (klsweep_local's n_jobs), else 1
    n_jobs: int | None = None
    # name: tpe (Optuna's default) | random | nsgaii | gp | cmaes | grid; seed; any other key is
    # passed to the Optuna sampler's constructor
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": None})
    # name: none | median | hyperband | successive_halving; any other key is passed to the
    # Optuna pruner's constructor. Pruning needs a single objective.
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    report_every: int = 5  # training steps between the values a run reports to the pruner
    # null: sqlite:///<sweep dir>/optuna.db; any Optuna storage URL without a password (libpq
    # finds PostgreSQL's in PGPASSFILE or ~/.pgpass); or env:NAME, the URL in the environment
    # variable NAME, which the sweeper and its trials read (keeps a password out of configs,
    # overrides and logs). ${oc.env:NAME} works too: trials then read KLSWEEP_STORAGE.
    storage: str | None = None
    study_name: str | None = None  # null: the sweep dir's name
    max_failures: int | None = None  # FAIL trials after which the sweep stops; null: n_trials
    # A worker records each running trial's heartbeat every heartbeat_interval seconds; a RUNNING
    # trial silent for grace_period seconds (its worker was killed) is failed and re-run, at most
    # max_retry times. Optuna's documentation pairs an interval with a grace period of twice it.
    heartbeat_interval: int = 10
    grace_period: int = 20
    max_retry: int = 2


ConfigStore.instance().store(group="hydra/sweeper", name="klsweep_optuna",
                             node=KLSweepOptunaConf, provider="klsweep")
