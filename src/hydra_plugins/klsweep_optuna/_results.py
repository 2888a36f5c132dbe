"""What a sweep leaves in its dir: trials.csv (every trial), best.yaml (one objective) or
pareto.yaml (several), and the table of those trials printed at the end. With constraints,
each trial shows whether it is feasible and its constraint values, and best.yaml / pareto.yaml
hold feasible trials only; when none is, best.yaml says so and names the least infeasible."""

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

from hydra_plugins.klsweep_optuna._constraints import is_feasible, violation
from hydra_plugins.klsweep_optuna._search_space import override_string


def trial_row(trial: FrozenTrial, objectives: Sequence[str],
              constraints: Sequence[str] = ()) -> dict[str, Any]:
    """One trial as trials.csv writes it: number, state, each objective, with constraints
    whether it is feasible and each constraint's value (> 0: broken by that much), each
    param, duration, the reason of a failure or a pruning, and the run dir."""
    values = trial.values or [None] * len(objectives)
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    held = {f"[{name}]": trial.constraints.get(name) for name in constraints}
    if constraints:
        held = {"feasible": is_feasible(trial) if trial.constraints else None, **held}
    return {"number": trial.number, "state": trial.state.name,
            **dict(zip(objectives, values, strict=True)), **held, **trial.params,
            "duration_s": None if duration is None else round(duration, 2),
            "reason": trial.user_attrs.get("reason"), "run_dir": trial.user_attrs.get("run_dir")}


def write_trials_csv(path: Path, study: optuna.Study, objectives: Sequence[str],
                     constraints: Sequence[str] = ()) -> None:
    trials = study.get_trials(deepcopy=False)
    rows = [trial_row(trial, objectives, constraints) for trial in trials]
    columns = list(dict.fromkeys(key for row in rows for key in row)) or [
        "number", "state", *objectives, "duration_s", "reason", "run_dir"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front ordered by the first objective
    (best first); Optuna's best_trial(s) skip the trials whose constraints are broken."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        try:
            return [study.best_trial]
        except ValueError:  # "No feasible trials are completed yet."
            return []
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.number))


def _entry(trial: FrozenTrial, objectives: Mapping[str, str],
           fixed: Sequence[str]) -> dict[str, Any]:
    overrides = [*fixed, *(override_string(k, v) for k, v in trial.params.items())]
    entry = {"number": trial.number, "values": dict(zip(objectives, trial.values, strict=True))}
    if trial.constraints:
        entry["constraints"] = dict(trial.constraints)
    return entry | {"params": dict(trial.params), "run_dir": trial.user_attrs.get("run_dir"),
                    "command": shlex.join(["python", "-m", "klsweep", *overrides])}


def count_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def least_infeasible(study: optuna.Study) -> FrozenTrial | None:
    """The complete trial that breaks its constraints by the least in all (the first such)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.constraints]
    return min(trials, key=lambda t: (violation(t), t.number), default=None)


def write_best(sweep_dir: Path, study: optuna.Study, objectives: Mapping[str, str],
               fixed: Sequence[str], storage_shown: str,
               constraints: Sequence[str] = ()) -> Path:
    """best.yaml or pareto.yaml: the storage as ``storage_shown`` (its password masked), and
    each trial with its values, params, run dir and the command that runs it again."""
    entries = [_entry(trial, objectives, fixed) for trial in best_trials(study)]
    several = len(objectives) > 1
    path = sweep_dir / ("pareto.yaml" if several else "best.yaml")
    payload = {"study": study.study_name, "storage": storage_shown,
               "objectives": dict(objectives)}
    if constraints:
        payload["constraints"] = list(constraints)
    payload["pareto" if several else "best"] = entries if several else next(iter(entries), None)
    least = least_infeasible(study) if constraints and not entries else None
    if least is not None:
        payload["no_feasible_trial"] = (f"none of the {count_complete(study)} complete trials "
                                        f"meets every constraint; the least infeasible "
                                        f"(total violation {violation(least):.4g}) follows")
        payload["least_infeasible"] = _entry(least, objectives, fixed)
    path.write_text(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True,
                                   width=10_000))  # one line per command
    return path


def format_table(trials: Sequence[FrozenTrial], objectives: Sequence[str],
                 constraints: Sequence[str] = ()) -> str:
    """A plain text table of ``trials``: number, objectives, constraint values, params."""
    rows = [trial_row(t, objectives, constraints) for t in trials]
    params = list(dict.fromkeys(key for t in trials for key in t.params))
    columns = ["number", *objectives, *(f"[{name}]" for name in constraints), *params]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)
