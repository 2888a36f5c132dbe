"""runs.csv and report.md: one row per run; first what the runs varied, then per panel of
(task, algorithm) a table of its groups as mean ± std over seeds, the best tracker named where
a schedule tracked a target, and the figures linked."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from klsweep.report.runs import (
    GROUP_METRICS,
    Group,
    Run,
    failures,
    flatten,
    ranked_groups,
    resolve_value,
    shown_keys,
    varying_keys,
)

CSV_COLUMNS = ("run", "group", "task", "algo", "estimator", "schedule", "placement", "seed",
               "status", "steps_done", "target", "unit", *GROUP_METRICS[:4], "reward_final",
               "kl_final", "kl_seq_final", "beta_final", "exact_kl", "exact_reward",
               "exact_frontier_gap", "mismatch_k3", "mismatch_max", "wall_time_s", "path")


def write_csv(path: Path, groups: Sequence[Group]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for group in groups:
            for run in group.runs:
                writer.writerow(run.record)


# Below this a value is floating-point rounding (a straight-line β's volatility), shown as 0.
_ROUNDING = 1e-12


def fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return "0" if abs(value) < _ROUNDING else f"{value:.{digits}g}"


def fmt_stat(stat: tuple[float, float, int], total: int, digits: int = 3,
             missing: str = "–") -> str:
    """``mean ± std``; for metrics some seeds lack (never settled), how many have it."""
    mean, std, n = stat
    if n == 0:
        return missing
    if std <= 1e-9 * abs(mean):  # seeds equal up to rounding
        std = 0.0
    text = f"{fmt(mean, digits)} ± {fmt(std, 2)}" if n > 1 else fmt(mean, digits)
    return text if n == total else f"{text} ({n}/{total})"


# a varied key with more values than this (a continuous search) shows its range
_LISTED_VALUES = 8


def _values(values: Sequence[object]) -> str:
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if len(distinct) > _LISTED_VALUES and all(isinstance(v, (int, float)) for v in distinct):
        return f"{len(distinct)} values from {fmt(distinct[0])} to {fmt(distinct[-1])}"
    shown = [fmt(v) if isinstance(v, float) else str(v) for v in distinct]
    return ", ".join(shown[:_LISTED_VALUES]) + (", …" if len(shown) > _LISTED_VALUES else "")


def varied_sentence(runs: Sequence[Run], groups: Sequence[Group]) -> str:
    """What the runs varied and with how many seeds, and what they had in common: the
    report's first words. Keys in the order the sweep varied them (summary.json's
    ``swept``), then by name."""
    dimensions = {"algorithm": [r.algo for r in runs], "task": [r.task for r in runs],
                  "schedule": [r.schedule for r in runs],
                  "estimator": [r.estimator for r in runs]}
    order = {key: i for i, key in enumerate(dict.fromkeys(
        key for run in runs for key in run.summary.get("swept") or {}))}
    flats = [flatten(run.config) for run in runs]
    for key in sorted(shown_keys(varying_keys(runs)), key=lambda k: (order.get(k, len(order)), k)):
        dimensions[key] = [resolve_value(flat.get(key), run.config)
                           for flat, run in zip(flats, runs, strict=True)]
    varied = [f"**{key}** ({_values(values)})" for key, values in dimensions.items()
              if len(set(map(str, values))) > 1]
    common = [f"{key} {values[0]}" for key, values in dimensions.items()
              if len(set(map(str, values))) == 1]
    counts = sorted({len(g.runs) for g in groups})
    seeds = sorted({run.seed for run in runs})
    listed = (f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
              if len(seeds) <= _LISTED_VALUES else "")
    per_group = (f"{counts[0]} seed{'s' if counts[0] > 1 else ''} each{listed}"
                 if len(counts) == 1 else f"{counts[0]}–{counts[-1]} seeds each")
    text = (f"They varied {' and '.join(varied)}: {len(groups)} groups, {per_group}."
            if varied else f"They varied only the seed: {per_group}.")
    return text + (f" All had {', '.join(common)}." if common else "")


def untracked_sentence(members: Sequence[Group]) -> str:
    """The lead of a panel where no schedule steers β toward a target KL."""
    schedules = ", ".join(dict.fromkeys(g.schedule for g in members))
    return (f"No schedule here steers β toward a target KL ({schedules}), so the groups are "
            f"not ranked by how well they tracked one; compare them on reward against KL "
            f"(the figures below and, where the runs reached common levels, at equal drift).")


def best_tracker_sentence(groups: Sequence[Group]) -> str:
    """The group with the lowest mean tracking error, its margin over the runner-up, and
    whether seeds separate the two (difference of means against twice its standard error)."""
    ranked = ranked_groups(groups)
    if not ranked:
        return "No group completed all its runs with a measured KL, so none is ranked."
    best = ranked[0]
    mean, std, n = best.stats["tracking_error"]
    text = (f"**{best.label}** tracked the target best: tracking error "
            f"{fmt_stat((mean, std, n), n)} over {n} seed{'s' if n > 1 else ''}, i.e. the KL "
            f"was on average {mean:.0%} away from the target over the second half")
    if len(ranked) == 1:
        return text + "."
    second = ranked[1]
    other, other_std, other_n = second.stats["tracking_error"]
    ratio = f"{other / mean:.1f}× as much" if mean > 0 else "more"
    text += (f", against {fmt_stat((other, other_std, other_n), other_n)} for the runner-up "
             f"**{second.label}** ({ratio})")
    if n > 1 and other_n > 1:
        standard_error = math.sqrt(std**2 / n + other_std**2 / other_n)
        if other - mean > 2 * standard_error:
            text += "; the gap is more than two standard errors"
        else:
            text += (f"; the gap is within two standard errors ({fmt(2 * standard_error, 2)}), "
                     f"so more seeds are needed to tell the two apart")
    return text + "."


# (header, metric, significant digits, text where no seed has the value)
_GROUP_COLUMNS = (("steps to ±20%", "steps_to_target", 3, "never"),
                  ("overshoot (max/target)", "overshoot", 3, "–"),
                  ("tracking error", "tracking_error", 3, "–"),
                  ("β volatility", "beta_volatility", 3, "–"),
                  ("final reward", "reward_final", 3, "–"),
                  ("final KL (nats/token)", "kl_final", 3, "–"))
# the columns that measure a KL against its target: none where no schedule steered toward one
_TARGET_METRICS = ("steps_to_target", "overshoot", "tracking_error")
_EXACT_COLUMNS = (("exact KL (nats/token)", "exact_kl", 3, "–"),
                  ("exact reward", "exact_reward", 3, "–"),
                  ("gap to frontier", "exact_frontier_gap", 2, "–"))
_ENGINE_COLUMNS = (("engine mismatch k3 (mean)", "mismatch_k3", 2, "–"),
                   ("engine max abs Δlog p", "mismatch_max", 2, "–"))
_WALL_TIME_COLUMN = (("wall time (s)", "wall_time_s", 2, "–"),)


def group_table(members: Sequence[Group]) -> list[str]:
    """The markdown table of a panel's groups, mean ± std over seeds; the target's columns
    where a schedule tracked one, the exact task's own where its runs have them, and the
    rollout engine's mismatch where an engine other than the trainer's model sampled."""
    exact = any(g.stats["exact_kl"][2] for g in members)
    engine = any(g.stats["mismatch_k3"][2] for g in members)
    tracked = any(g.tracks_target for g in members)
    group_columns = _GROUP_COLUMNS if tracked else tuple(
        c for c in _GROUP_COLUMNS if c[1] not in _TARGET_METRICS)
    columns = (group_columns + (_EXACT_COLUMNS if exact else ())
               + (_ENGINE_COLUMNS if engine else ()) + _WALL_TIME_COLUMN)
    lines = ["| group | seeds | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for g in members:
        n = len(g.runs)
        failed = ", ".join(f"{k} {s}" for s, k in sorted(failures(g).items()))
        cells = [fmt_stat(g.stats[metric], n, digits, missing)
                 for _, metric, digits, missing in columns]
        lines.append(f"| {g.label} | {n}{f' ({failed})' if failed else ''} | "
                     + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, runs: Sequence[Run], groups: Sequence[Group],
                   figures: dict[str, str], sources: Sequence[str],
                   sections: Sequence[str] = ()) -> None:
    """report.md; ``sections``: further markdown lines, after the panels' tables."""
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.record["status"]] = statuses.get(run.record["status"], 0) + 1
    units = {run.unit for run in runs}
    kl_unit = "nats/token" if units == {"token"} else "in kl.unit"
    lines = [f"# klsweep report: {', '.join(Path(p).name for p in sources)}", "",
             f"{len(runs)} runs from {', '.join(sources)} "
             f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}). "
             + varied_sentence(runs, groups), "",
             "Each row of the tables below is a group of runs that differ only by seed, as "
             "mean ± std over seeds (sample std). Per-run values are in `runs.csv`.", ""]
    for panel in dict.fromkeys(g.panel for g in groups):
        members = [g for g in groups if g.panel == panel]
        targets = sorted({r.target for g in members for r in g.runs if r.tracks_target})
        lead = (f"Target KL: {', '.join(fmt(t) for t in targets)} ({kl_unit}). "
                + best_tracker_sentence(members)) if targets else untracked_sentence(members)
        lines += [f"## {panel}", "", lead, "", *group_table(members), ""]
    lines += list(sections)
    for title, name in figures.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["## Runs", "",
              "| run | group | status | steps | final reward | final KL | final β | "
              "steps to ±20% | overshoot | tracking error | β volatility |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        for run in g.runs:
            r = run.record
            lines.append(
                f"| {r['run']} | {g.label} | {r['status']} | {r['steps_done']} | "
                f"{fmt(r['reward_final'], 4)} | {fmt(r['kl_final'], 4)} | "
                f"{fmt(r['beta_final'], 4)} | {fmt(r['steps_to_target'])} | "
                f"{fmt(r['overshoot'])} | {fmt(r['tracking_error'])} | "
                f"{fmt(r['beta_volatility'])} |")
    lines += ["", "## How the numbers are computed", "",
              "* **final reward / KL / β**: mean over the last quarter of the logged steps "
              "(β: its last value), as in `summary.json`.",
              "* **steps to ±20%**: the first step from which the KL, as a trailing mean over "
              "10 steps, stays within target·(1 ± 0.2) to the end; *never* if it is outside "
              "at the end.",
              "* **overshoot**: the largest 10-step trailing mean of KL, divided by the target.",
              "* **tracking error**: mean of |KL − target| / target over the second half of "
              "the steps.",
              "* **β volatility**: standard deviation of β's step-to-step changes divided by "
              "mean β (0 for a constant or straight-line β).",
              "* KL is the configured estimator (`kl/mean`, nats/token; `kl/seq` for "
              "`kl.unit=sequence`).", ""]
    path.write_text("\n".join(lines))
