"""What a sweep leaves in its dir: trials.csv (every trial), best.yaml (one objective) or
pareto.yaml (several), and the table of those trials printed at the end."""

from __future__ import annotations

import csv
import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.klsweep_optuna._search_space import override_string


def trial_row(trial: FrozenTrial, objectives: Sequence[str]) -> dict[str, Any]:
    """One trial as trials.csv writes it: number, state, each objective, each param,
    duration, the reason of a failure or a pruning, and the run dir."""
    values = trial.values or [None] * len(objectives)
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return {"number": trial.number, "state": trial.state.name,
            **dict(zip(objectives, values, strict=True)), **trial.params,
            "duration_s": None if duration is None else round(duration, 2),
            "reason": trial.user_attrs.get("reason"), "run_dir": trial.user_attrs.get("run_dir")}


def write_trials_csv(path: Path, study: optuna.Study, objectives: Sequence[str]) -> None:
    trials = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(key for trial in trials for key in trial.params))
    columns = ["number", "state", *objectives, *params, "duration_s", "reason", "run_dir"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for trial in trials:
            writer.writerow(trial_row(trial, objectives))


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front ordered by the first objective (best first)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.number))


def write_best(sweep_dir: Path, study: optuna.Study, objectives: Mapping[str, str],
               fixed: Sequence[str], storage_shown: str) -> Path:
    """best.yaml or pareto.yaml: the storage as ``storage_shown`` (its password masked), and
    each trial with its values, params, run dir and the command that runs it again."""
    entries = []
    for trial in best_trials(study):
        overrides = [*fixed, *(override_string(k, v) for k, v in trial.params.items())]
        entries.append({
            "number": trial.number,
            "values": dict(zip(objectives, trial.values, strict=True)),
            "params": dict(trial.params),
            "run_dir": trial.user_attrs.get("run_dir"),
            "command": shlex.join(["python", "-m", "klsweep", *overrides]),
        })
    several = len(objectives) > 1
    path = sweep_dir / ("pareto.yaml" if several else "best.yaml")
    payload = {"study": study.study_name, "storage": storage_shown,
               "objectives": dict(objectives),
               "pareto" if several else "best": entries if several else next(iter(entries), None)}
    path.write_text(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True,
                                   width=10_000))  # one line per command
    return path


def format_table(trials: Sequence[FrozenTrial], objectives: Sequence[str]) -> str:
    """A plain text table of ``trials``: number, objectives, params."""
    rows = [trial_row(t, objectives) for t in trials]
    params = list(dict.fromkeys(key for t in trials for key in t.params))
    columns = ["number", *objectives, *params]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)
