"""The schema of ``hydra.sweeper`` for ``hydra/sweeper: klsweep_optuna``: each field's default
and its help line (``metadata["help"]``, which the site's configuration reference shows)."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def option(default: Any = None, *, factory: Any = None, help: str) -> Any:
    """A field with its help line."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class BudgetPruningConf:
    # Feedback β (adaptive, multiplicative, pid, dual) raises β while the KL is high, so it is
    # pruned only once the bound is broken whatever the remaining steps log (klsweep.budget).
    margin: float | None = option(
        0.5, help="open-loop β (fixed, linear, cosine, exponential): prune once the KL's running "
                  "last-quarter mean is over the bound by more than this (relative; 50%: well "
                  "past the noise of a last-quarter mean); null: never on that evidence")
    min_progress: float = option(
        0.5, help="the share of the steps an open-loop run must have run before that rule "
                  "applies (half: the schedule has had time to act)")
    enabled: bool = option(True, help="prune a trial whose KL broke a '<=' constraint on kl/* "
                                      "for good (a feedback β: when certain)")


@dataclass
class KLSweepOptunaConf:
    _target_: str = "hydra_plugins.klsweep_optuna.klsweep_optuna_sweeper.KLSweepOptunaSweeper"
    objectives: dict[str, str | None] = option(
        factory=dict,
        help="metric name (a number of the run's summary.json) -> maximize | minimize; several: "
             "a Pareto front. Empty: reward/final, maximized. null drops an objective a preset "
             "set: 'hydra.sweeper.objectives={kl/final:null}' leaves reward/final alone")
    constraints: list[str] = option(
        factory=list,
        help="\"metric <= number\" or \"metric >= number\", metric a number of the run's "
             "summary: a trial that breaks one is infeasible; best.yaml and the Pareto front "
             "hold feasible trials only")
    budget_pruning: BudgetPruningConf = option(
        factory=lambda: BudgetPruningConf(),
        help="prune a trial whose KL broke a '<=' constraint on kl/* for good (klsweep.budget)")
    params: dict[str, Any] = option(
        factory=dict,
        help="config key -> search space in Hydra's override grammar: interval(a, b), "
             "tag(log, interval(a, b)), int(interval(a, b)), range(a, b, step), choice(x, y), x,y")
    n_trials: int = option(20, help="COMPLETE or PRUNED trials the study ends with (a resumed "
                                    "study counts its old ones)")
    n_jobs: int | None = option(
        None, help="trials asked and launched per batch; null: as many as the launcher runs at "
                   "once (klsweep_local's n_jobs, submitit_slurm's array_parallelism), else 1")
    sampler: dict[str, Any] = option(
        factory=lambda: {"name": "tpe", "seed": None},
        help="name: tpe (Optuna's default) | random | nsgaii | gp | cmaes | grid; seed; any "
             "other key is passed to the Optuna sampler's constructor")
    pruner: dict[str, Any] = option(
        factory=lambda: {"name": "none"},
        help="name: none | median | hyperband | successive_halving; any other key is passed to "
             "the Optuna pruner's constructor. Pruning needs a single objective")
    report_every: int = option(5, help="training steps between the values a run reports to the "
                                       "pruner")
    storage: str | None = option(
        None, help="null: sqlite:///<sweep dir>/optuna.db; any Optuna storage URL without a "
                   "password (libpq finds PostgreSQL's in PGPASSFILE or ~/.pgpass); or env:NAME, "
                   "the URL in the environment variable NAME, which the sweeper and its trials "
                   "read (keeps a password out of configs, overrides and logs); ${oc.env:NAME} "
                   "works too: trials then read KLSWEEP_STORAGE")
    study_name: str | None = option(None, help="null: the sweep dir's name")
    max_failures: int | None = option(None, help="FAIL trials after which the sweep stops; "
                                                 "null: n_trials")
    # Optuna's documentation pairs a heartbeat interval with a grace period of twice it.
    heartbeat_interval: int = option(10, help="seconds between a worker's heartbeats for each "
                                              "running trial")
    grace_period: int = option(20, help="seconds after which a silent RUNNING trial (its worker "
                                        "was killed) is failed and re-run")
    max_retry: int = option(2, help="re-runs of a trial whose worker died")


ConfigStore.instance().store(group="hydra/sweeper", name="klsweep_optuna",
                             node=KLSweepOptunaConf, provider="klsweep")
