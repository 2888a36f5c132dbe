"""``python -m klsweep.report PATH... [--out DIR] [--wandb]``: compare runs side by side.

Reads every run dir under the PATHs (a sweep dir, run dirs or globs): its ``metrics.jsonl``,
``summary.json``, ``.hydra/config.yaml`` and, for the exact task, ``exact.json``. Writes into
the first PATH (or ``--out``) ``report.md``, ``runs.csv`` and the figures of
``klsweep.report_figures``. Runs that differ only by seed form one group (``report_runs``),
shown as mean ± std over its seeds; groups are compared within one panel per (task,
algorithm). ``--wandb`` logs the tables and figures to a W&B run of job_type=report.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from klsweep.report_runs import (
    GROUP_METRICS,
    Group,
    Run,
    failures,
    find_run_dirs,
    group_runs,
    load_run,
    ranked_groups,
)

log = logging.getLogger("klsweep")

CSV_COLUMNS = ("run", "group", "task", "algo", "estimator", "schedule", "placement", "seed",
               "status", "steps_done", "target", "unit", *GROUP_METRICS[:4], "reward_final",
               "kl_final", "kl_seq_final", "beta_final", "exact_kl", "exact_reward",
               "exact_frontier_gap", "wall_time_s", "path")


# --- runs.csv and report.md -----------------------------------------------------------------
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
_EXACT_COLUMNS = (("exact KL (nats/token)", "exact_kl", 3, "–"),
                  ("exact reward", "exact_reward", 3, "–"),
                  ("gap to frontier", "exact_frontier_gap", 2, "–"))
_WALL_TIME_COLUMN = (("wall time (s)", "wall_time_s", 2, "–"),)


def group_table(members: Sequence[Group]) -> list[str]:
    """The markdown table of a panel's groups, mean ± std over seeds; the exact task's own
    columns where its runs have them."""
    exact = any(g.stats["exact_kl"][2] for g in members)
    columns = _GROUP_COLUMNS + (_EXACT_COLUMNS if exact else ()) + _WALL_TIME_COLUMN
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
                   figures: dict[str, str], sources: Sequence[str]) -> None:
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.record["status"]] = statuses.get(run.record["status"], 0) + 1
    units = {run.unit for run in runs}
    kl_unit = "nats/token" if units == {"token"} else "in kl.unit"
    lines = [f"# klsweep report: {', '.join(Path(p).name for p in sources)}", "",
             f"{len(runs)} runs from {', '.join(sources)} "
             f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}). "
             f"Each row of the tables below is a group of runs that differ only by seed, as "
             f"mean ± std over seeds (sample std). Per-run values are in `runs.csv`.", ""]
    for panel in dict.fromkeys(g.panel for g in groups):
        members = [g for g in groups if g.panel == panel]
        targets = sorted({r.target for g in members for r in g.runs})
        lines += [f"## {panel}", "",
                  f"Target KL: {', '.join(fmt(t) for t in targets)} ({kl_unit}). "
                  + best_tracker_sentence(members), "",
                  *group_table(members), ""]
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


# --- W&B -------------------------------------------------------------------------------------
def log_to_wandb(out: Path, runs: Sequence[Run], groups: Sequence[Group],
                 figures: dict[str, str]) -> str:
    """Log the comparison table and the figures to one W&B run of job_type=report in the
    sweep's group; return the run's local dir."""
    import wandb

    from klsweep.records import wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    project = next((run.get("logger.project") for run in runs if run.get("logger.project")),
                   "klsweep")
    group = next((run.summary["group"] for run in runs if run.summary.get("group")), out.name)
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{group}",
                     dir=str(out), mode=wandb_mode("auto"),
                     config={"runs": len(runs), "paths": sorted({str(r.path) for r in runs})})
    rows = [[run_.record.get(c) for c in CSV_COLUMNS] for g in groups for run_ in g.runs]
    summary_columns = ["panel", "group", "seeds"] + [f"{m}_{s}" for m in GROUP_METRICS
                                                    for s in ("mean", "std")]
    summary_rows = [[g.panel, g.label, len(g.runs)]
                    + [g.stats[m][i] for m in GROUP_METRICS for i in (0, 1)] for g in groups]
    payload: dict[str, Any] = {"report/runs": wandb.Table(columns=list(CSV_COLUMNS), data=rows),
                               "report/groups": wandb.Table(columns=summary_columns,
                                                            data=summary_rows)}
    for title, name in figures.items():
        payload[f"report/{Path(name).stem}"] = wandb.Image(str(out / name), caption=title)
    run.log(payload)
    ranked = ranked_groups(groups)
    if ranked:
        run.summary.update({"report/best_tracking": ranked[0].label,
                            "report/best_tracking_error": ranked[0].stats["tracking_error"][0]})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


# --- command ---------------------------------------------------------------------------------
def build_report(paths: Sequence[str], out: Path | None = None,
                 use_wandb: bool = False) -> Path:
    """Read the runs under ``paths``, write report.md, runs.csv and the figures into ``out``
    (default: the first path); return report.md's path."""
    from klsweep.report_figures import draw_all

    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise FileNotFoundError(f"no metrics.jsonl under {', '.join(paths)}")
    runs = [load_run(path) for path in run_dirs]
    groups = group_runs(runs)
    if out is None:
        # a glob as first PATH: the dir its matches share
        matches = sorted(glob.glob(paths[0])) or [paths[0]]
        out = Path(matches[0] if len(matches) == 1 else os.path.commonpath(matches))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "runs.csv", groups)
    figures = draw_all(groups, out)
    report = out / "report.md"
    write_markdown(report, runs, groups, figures, [str(p) for p in paths])
    if use_wandb:
        wandb_dir = log_to_wandb(out, runs, groups, figures)
        log.info("klsweep.report: logged to W&B run %s", wandb_dir)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m klsweep.report",
        description="Compare klsweep runs: report.md, runs.csv and figures (KL and β "
                    "trajectories, reward against KL, tracking metrics per schedule).")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a sweep dir, run dirs, or globs of them")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: the first PATH)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and figures to a W&B run of job_type=report "
                             "in the sweep's group (offline without credentials)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        report = build_report(args.paths, args.out, args.wandb)
    except FileNotFoundError as err:
        print(f"klsweep.report: error: {err}", file=sys.stderr)
        return 2
    print(f"klsweep.report: wrote {report}, {report.parent / 'runs.csv'} and figures in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
