"""Pruning a sweep's trial from inside its run.

The Optuna sweeper passes each run its study and trial number (``trial.storage``,
``trial.study_name``, ``trial.number``; the storage as a URL without a password, or as
``env:NAME`` read from the run's environment, see ``klsweep.storage``) and writes the study's
objectives, pruner and reporting interval into the study's user attribute ``klsweep``. The
callback below reads them back from the storage, reports the first objective's running value
every ``report_every`` steps and stops the run with ``optuna.TrialPruned`` when the pruner
says so, or at once when its KL broke a budget of ``hydra.sweeper.constraints`` for good
(``klsweep.budget``); the sweeper then records the trial as PRUNED with the reason. The
running value is computed by the same ``summarize`` that writes summary.json, so an
intermediate value and the final one mean the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback

from klsweep.budget import Constraint, budget_breach, constraint_values, logged_key
from klsweep.kl.schedules import TargetSchedule
from klsweep.records import summarize
from klsweep.storage import engine_kwargs, resolve_storage

SWEEP_ATTR = "klsweep"  # the study's user attribute that the sweeper writes and runs read

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}


def make_pruner(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner ``{name: median, n_warmup_steps: 10, ...}`` describes: every key but
    ``name`` is an argument of the Optuna pruner's constructor."""
    options = {key: value for key, value in spec.items() if key != "name"}
    return PRUNERS[spec["name"]](**options)


class TrialPruning(Callback):
    """Reports the sweep's first objective to trial ``number`` of the study through the
    storage every ``report_every`` steps, and raises ``optuna.TrialPruned`` when the study's
    pruner says the trial will not beat the others (Optuna has no pruner for several
    objectives) or when its KL broke a budget for good (in any study)."""

    def __init__(self, storage: str, study_name: str, number: int) -> None:
        url = resolve_storage(storage)
        rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
        study_id = rdb.get_study_id_from_name(study_name)
        sweep = rdb.get_study_user_attrs(study_id)[SWEEP_ATTR]
        study = optuna.load_study(study_name=study_name, storage=rdb,
                                  pruner=make_pruner(sweep["pruner"]))
        self.objective = next(iter(sweep["objectives"]))
        self.report_every = int(sweep["report_every"])
        self.constraints = [Constraint(**c) for c in sweep.get("constraints", [])]
        self.budget_pruning = sweep.get("budget_pruning") or {}
        self.single_objective = len(study.directions) == 1
        self.trial = optuna.trial.Trial(
            study, rdb.get_trial_id_from_study_id_trial_number(study_id, number))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step_count
        if step % self.report_every:
            return
        summary = summarize(pl_module.history)
        reason = self.budget_reason(pl_module)
        if reason is None and self.single_objective:
            value = summary.get(self.objective)
            if value is None or not math.isfinite(value):
                return
            self.trial.report(value, step)
            if self.trial.should_prune():
                reason = f"{self.objective} = {value:.4g}"
        if reason is None:
            return
        # a pruned trial keeps the constraint values it had: the samplers rank it by them
        values, _ = constraint_values(self.constraints, summary)
        for name, value in (values or {}).items():
            self.trial.set_constraint(name, value)
        raise optuna.TrialPruned(f"pruned after step {step}: {reason}")

    def budget_reason(self, pl_module: L.LightningModule) -> str | None:
        """Why the run's KL broke a '<=' budget for good (``klsweep.budget``), or None."""
        spec = self.budget_pruning
        if not spec.get("enabled", False):
            return None
        for constraint in self.constraints:
            key = logged_key(constraint.metric)
            if constraint.op != "<=" or key is None:
                continue
            values = [row[key] for row in pl_module.history if key in row]
            reason = budget_breach(values, pl_module.steps, constraint.bound,
                                   feedback=isinstance(pl_module.schedule, TargetSchedule),
                                   margin=spec.get("margin"),
                                   min_progress=spec.get("min_progress", 0.5))
            if reason is not None:
                return f"{constraint.metric} {reason}"
        return None
