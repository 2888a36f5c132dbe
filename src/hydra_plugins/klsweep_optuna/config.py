"""The schema of ``hydra.sweeper`` for ``hydra/sweeper: klsweep_optuna``."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class BudgetPruningConf:
    # Open-loop β (fixed, linear, cosine, exponential): prune once min_progress of the steps
    # ran and the KL's running last-quarter mean is over the bound by more than margin
    # (relative); null: never on that evidence. Feedback β (adaptive, multiplicative, pid,
    # dual) raises β while the KL is high, so it is pruned only once the bound is broken
    # whatever the remaining steps log (see klsweep.budget).
    margin: float | None = 0.5  # 50% over: well past the noise of a last-quarter mean
    min_progress: float = 0.5  # half the run: the schedule has had time to act
    enabled: bool = True


@dataclass
class KLSweepOptunaConf:
    _target_: str = "hydra_plugins.klsweep_optuna.klsweep_optuna_sweeper.KLSweepOptunaSweeper"
    # metric name (a key of the run's summary) -> maximize | minimize; several: a Pareto front.
    # Empty: reward/final, maximized. null drops an objective a preset set: the command line
    # merges mappings, so 'hydra.sweeper.objectives={kl/final:null}' leaves reward/final alone.
    objectives: dict[str, str | None] = field(default_factory=dict)
    # "metric <= number" or "metric >= number", metric a number of the run's summary: a trial
    # that breaks one is infeasible (Optuna's constrained optimisation); best.yaml and the
    # Pareto front hold feasible trials only
    constraints: list[str] = field(default_factory=list)
    # prune a trial whose KL broke a '<=' constraint on kl/* for good (klsweep.budget)
    budget_pruning: BudgetPruningConf = field(default_factory=lambda: BudgetPruningConf())
    # config key -> search space in Hydra's override grammar: interval(a, b),
    # tag(log, interval(a, b)), int(interval(a, b)), range(a, b, step), choice(x, y), x,y
    params: dict[str, Any] = field(default_factory=dict)
    # COMPLETE or PRUNED trials the study ends with (a resumed study counts its old ones)
    n_trials: int = 20
    # trials asked and launched per batch (joblib, klsweep_local and submitit run a batch at
    # once); null: as many as the launcher runs at once (klsweep_local's n_jobs,
    # submitit_slurm's array_parallelism), else 1
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
