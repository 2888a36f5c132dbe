"""The runs a report compares: each run dir read into a ``Run`` (config, summary, metrics,
exact.json and its row of runs.csv), and runs grouped by everything but the seed.

A group's statistics are mean ± std over its seeds (``klsweep.tracking.mean_std``); where a
schedule of the panel steers β toward the target, groups are ranked by mean tracking error,
those whose runs all completed first; elsewhere they are listed by label.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from klsweep.kl.schedules import SCHEDULES
from klsweep.records import read_metrics, summarize
from klsweep.tracking import mean_std, run_tracking

# Config keys that never make two runs differ in kind: the seed (aggregated over), names,
# bookkeeping and where things are written.
_IGNORED_PREFIXES = ("seed", "name", "trial.", "checkpoint.", "logger.", "task.cache_dir",
                     "trainer.", "threads")
# The metrics aggregated per group, in the order of the report's table.
GROUP_METRICS = ("steps_to_target", "overshoot", "tracking_error", "beta_volatility",
                 "reward_final", "kl_final", "wall_time_s")
# The exact task's last evaluation, aggregated too where runs have it.
EXACT_METRICS = ("exact_kl", "exact_reward", "exact_frontier_gap")
# How far a rollout engine's log-probs were from the trainer's (rollout.engine=vllm), over
# the whole run: the mean of each step's rollout/mismatch_k3 and the largest mismatch_max.
ENGINE_METRICS = ("mismatch_k3", "mismatch_max")


@dataclass
class Run:
    """One run dir, read: its config, summary, metrics rows and (exact task) exact.json."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, float]]
    exact: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def algo(self) -> str:
        return str(self.summary.get("algo") or self.get("algo.name", "?"))

    @property
    def task(self) -> str:
        return str(self.summary.get("task") or self.get("task.name", "?"))

    @property
    def schedule(self) -> str:
        return str(self.summary.get("schedule") or self.get("kl.schedule.name", "?"))

    @property
    def estimator(self) -> str:
        value = self.summary.get("estimator") or self.get("kl.estimator")
        return str(value if value and "${" not in str(value) else self.get("algo.kl_estimator"))

    @property
    def unit(self) -> str:
        return str(self.get("kl.unit", "token"))

    @property
    def kl_key(self) -> str:
        """The KL the schedule steers, in the unit of ``kl.target``."""
        return "kl/seq" if self.unit == "sequence" else "kl/mean"

    @property
    def target(self) -> float:
        return float(self.get("kl.target", math.nan))

    @property
    def seed(self) -> int:
        return int(self.summary.get("seed", self.get("seed", 0)))

    @property
    def tracks_target(self) -> bool:
        """Whether its schedule steers β toward ``kl.target`` (the feedback schedules); the
        others (fixed, linear, cosine, exponential) never read the target."""
        return tracks_target(self.schedule)

    @property
    def name(self) -> str:
        return str(self.summary.get("name")
                   or f"{self.algo}-{self.estimator}-{self.schedule}-s{self.seed}")


@dataclass
class Group:
    """Runs of one panel that differ only by seed."""

    panel: str
    label: str
    schedule: str
    runs: list[Run]
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    @property
    def tracks_target(self) -> bool:
        return tracks_target(self.schedule)


def tracks_target(schedule: str) -> bool:
    return bool(getattr(SCHEDULES.get(schedule), "needs_target", False))


# --- reading ---------------------------------------------------------------------------------
def find_run_dirs(paths: Iterable[str]) -> list[Path]:
    """Every dir holding a metrics.jsonl, at or below each PATH (globs expanded)."""
    return dirs_holding(paths, "metrics.jsonl")


def dirs_holding(paths: Iterable[str], name: str) -> list[Path]:
    """Every dir holding a file ``name``, at or below each PATH (globs expanded), in natural
    order."""
    found: dict[Path, None] = {}
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for match in matches:
            root = Path(match)
            if (root / name).is_file():
                found[root.resolve()] = None
            elif root.is_dir():
                for record in sorted(root.rglob(name)):
                    found[record.parent.resolve()] = None
            else:
                raise FileNotFoundError(f"no run dir at {match} (expected a dir holding "
                                        f"{name}, or a sweep dir above such dirs)")
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.parts)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_run(path: Path) -> Run:
    config_path = path / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    run = Run(path=path, config=config or {}, summary=_read_json(path / "summary.json") or {},
              rows=read_metrics(path / "metrics.jsonl"), exact=_read_json(path / "exact.json"))
    run.record = run_record(run)
    return run


def resolve_value(value: Any, config: dict[str, Any]) -> Any:
    """A plain ``${a.b}`` reference into the config, resolved (what Hydra saved unresolved)."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        node: Any = config
        for part in value[2:-1].split("."):
            if not isinstance(node, dict) or part not in node:
                return value
            node = node[part]
        return node
    return value


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = json.dumps(value) if isinstance(value, list) else value
    return out


# --- per run ---------------------------------------------------------------------------------
def run_record(run: Run) -> dict[str, Any]:
    """One row of runs.csv: final values recomputed from metrics.jsonl, tracking metrics,
    status and wall time from summary.json."""
    final = summarize(run.rows)
    tracking = run_tracking(run.rows, run.target, run.kl_key)
    record: dict[str, Any] = {
        "run": run.name, "task": run.task, "algo": run.algo, "estimator": run.estimator,
        "schedule": run.schedule, "placement": resolve_value(
            run.summary.get("placement") or run.get("kl.placement"), run.config),
        "seed": run.seed, "status": run.summary.get("status", "incomplete"),
        "steps_done": len(run.rows), "target": run.target, "unit": run.unit,
        "steps_to_target": tracking["tracking/steps_to_target"],
        "overshoot": tracking["tracking/overshoot"],
        "tracking_error": tracking["tracking/error"],
        "beta_volatility": tracking["tracking/beta_volatility"],
        "reward_final": final.get("reward/final", math.nan),
        "kl_final": final.get("kl/final", math.nan),
        "kl_seq_final": final.get("kl/seq_final", math.nan),
        "beta_final": final.get("kl/beta_final", math.nan),
        "wall_time_s": float(run.summary.get("wall_time_s", math.nan)),
        "path": str(run.path),
    }
    record.update(exact_record(run))
    record.update(engine_record(run))
    return record


def engine_record(run: Run) -> dict[str, float]:
    """The engine-trainer mismatch over the run's steps (none: the trainer's model sampled)."""
    rows = [row for row in run.rows if "rollout/mismatch_k3" in row]
    if not rows:
        return {}
    return {"mismatch_k3": sum(row["rollout/mismatch_k3"] for row in rows) / len(rows),
            "mismatch_max": max(row["rollout/mismatch_max"] for row in rows)}


def exact_record(run: Run) -> dict[str, float]:
    """The exact task's last evaluation: KL per token (exact/kl is per sequence, and every
    completion has ``task.completion_len`` tokens), reward and the gap to the frontier."""
    rows = [row for row in run.rows if "exact/kl" in row]
    if not rows:
        return {}
    length = float(run.get("task.completion_len", 1))
    return {"exact_kl": rows[-1]["exact/kl"] / length, "exact_reward": rows[-1]["exact/reward"],
            "exact_frontier_gap": rows[-1].get("exact/frontier_gap", math.nan)}


# --- groups ----------------------------------------------------------------------------------
def _ignored(key: str) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p) for p in _IGNORED_PREFIXES)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value differs between runs (seed and bookkeeping excluded)."""
    flats = [flatten(run.config) for run in runs]
    keys = sorted({key for flat in flats for key in flat})
    return [key for key in keys if not _ignored(key)
            and len({json.dumps(flat.get(key), default=str) for flat in flats}) > 1]


def shown_keys(varying: Sequence[str]) -> list[str]:
    """The varying keys that a group's label names beside its schedule and estimator: not
    those that follow from the schedule, the algorithm or the task chosen."""
    return [key for key in varying if not key.startswith(("kl.schedule.", "algo.", "task."))
            and key != "kl.estimator"]


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by panel (task, algorithm) and, within it, by every varying config value
    but the seed. A group's label is its schedule plus the other values that vary. In a
    panel where some schedule steers β toward the target, groups are ranked by tracking
    error; in one where none does, they are listed in the order of their labels."""
    varying = varying_keys(runs)
    shown = shown_keys(varying)
    estimators_vary = len({run.estimator for run in runs}) > 1
    groups: dict[tuple, Group] = {}
    for run in runs:
        flat = flatten(run.config)
        panel = f"{run.algo} · {run.task}"
        key = (panel, run.estimator, *(json.dumps(flat.get(k), default=str) for k in varying))
        if key not in groups:
            parts = [run.schedule] + ([run.estimator] if estimators_vary else [])
            parts += [f"{k}={flat.get(k)}" for k in shown]
            groups[key] = Group(panel=panel, label=" · ".join(parts), schedule=run.schedule,
                                runs=[])
        groups[key].runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: r.seed)
        for run in group.runs:
            run.record["group"] = group.label
        group.stats = {m: mean_std(r.record.get(m, math.nan) for r in group.runs)
                       for m in GROUP_METRICS + EXACT_METRICS + ENGINE_METRICS}
    tracking = {g.panel for g in groups.values() if g.tracks_target}
    return sorted(groups.values(), key=lambda g: (g.panel, *_rank(g, g.panel in tracking),
                                                  _natural(g.label)))


def _rank(group: Group, by_tracking: bool) -> tuple[bool, float]:
    """Groups whose runs all completed first, then by mean tracking error: a schedule whose
    run diverged did not track the target, whatever its error before it stopped."""
    error = group.stats["tracking_error"][0] if by_tracking else math.inf
    return (bool(failures(group)), error if math.isfinite(error) else math.inf)


def _natural(label: str) -> tuple:
    """A label's order with its numbers compared as numbers (β 0.03 before 0.1 before 1e+01)."""
    parts = re.split(r"(\d+(?:\.\d*)?(?:e[-+]?\d+)?)", label)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def ranked_groups(groups: Sequence[Group]) -> list[Group]:
    """The groups that can be ranked by tracking error (all runs completed, KL measured, in a
    panel where some schedule steered β toward the target), best first."""
    tracking = {g.panel for g in groups if g.tracks_target}
    return sorted((g for g in groups if g.panel in tracking and not failures(g)
                   and math.isfinite(g.stats["tracking_error"][0])),
                  key=lambda g: g.stats["tracking_error"][0])


def failures(group: Group) -> dict[str, int]:
    """How many of the group's runs ended with each status other than completed."""
    counts: dict[str, int] = {}
    for run in group.runs:
        if run.record["status"] != "completed":
            counts[run.record["status"]] = counts.get(run.record["status"], 0) + 1
    return counts
