"""``python -m klsweep.report PATH... [--out DIR] [--wandb]``: compare runs side by side.

Reads every run dir under the PATHs (a sweep dir, run dirs or globs): its ``metrics.jsonl``,
``summary.json``, ``.hydra/config.yaml`` and, for the exact task, ``exact.json``. Writes into
the first PATH (or ``--out``) ``report.md`` and ``runs.csv`` (``markdown``) and the figures
(``figures``); for runs that optimised a proxy reward, the over-optimisation fit and figure
(``overoptimization``). Runs that differ only by seed form one group (``runs``), shown as
mean ± std over its seeds; groups are compared within one panel per (task, algorithm).
Each panel's schedules are also compared at equal drift, the reward where each run's KL
first reached common levels (``equal_drift``: equal_drift.md, a section and a figure).
KL-gradient audits found under the PATHs join the report (``audits``: their tables and
figures copied beside it, a section). Runs with a held-out evaluation (task=reasoning) add
pass@k against k per group and its reference, accuracy against KL, entropy over the steps
and a pass@k table (``rlvr``).
``--wandb`` logs the tables and figures to a W&B run of job_type=report (``wandb_run``).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from klsweep.report.markdown import write_csv, write_markdown
from klsweep.report.runs import find_run_dirs, group_runs, load_run
from klsweep.report.wandb_run import log_to_wandb

log = logging.getLogger("klsweep")


def build_report(paths: Sequence[str], out: Path | None = None,
                 use_wandb: bool = False, budget: float | None = None) -> Path:
    """Read the runs under ``paths``, write report.md, runs.csv and the figures into ``out``
    (default: the first path); return report.md's path. ``budget``: the KL level the
    equal-drift comparison always includes (default: the runs' common kl.target)."""
    from klsweep.report import audits as audit_files
    from klsweep.report import equal_drift, rlvr
    from klsweep.report.figures import draw_all
    from klsweep.report.overoptimization import (
        FIGURE,
        markdown_lines,
        plot_overoptimization,
        proxy_groups,
        verdict,
    )

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
    proxies = proxy_groups(runs)
    if proxies:
        plot_overoptimization(proxies, out / FIGURE)
        figures["Over-optimisation: gold and proxy reward against √KL"] = FIGURE
        for group in proxies:
            log.info("klsweep.report: over-optimisation: %s", verdict(group, bold=False))
    drift = equal_drift.compare(groups, budget)
    drift_lines = equal_drift.markdown_lines(drift)
    if drift:
        equal_drift.plot_equal_drift(drift, out / equal_drift.FIGURE)
        figures["Reward against KL at equal drift"] = equal_drift.FIGURE
        (out / equal_drift.TABLE).write_text("\n".join(drift_lines))
    audits = audit_files.find_audits(paths)
    figures.update(audit_files.copy_into(audits, out))
    verifiable = rlvr.rlvr_groups(groups)
    if verifiable:
        figures.update(rlvr.draw(verifiable, out))
    report = out / "report.md"
    write_markdown(report, runs, groups, figures, [str(p) for p in paths],
                   sections=[*(rlvr.markdown_lines(verifiable) if verifiable else ()),
                             *(markdown_lines(proxies) if proxies else ()), *drift_lines,
                             *(audit_files.markdown_lines(audits) if audits else ())])
    if use_wandb:
        tables = {"equal_drift_table": (equal_drift.COLUMNS, [row for c in drift
                                                              for row in c.rows()])} \
            if drift else {}
        if audits:
            tables["audit_table"] = audit_files.wandb_table(audits)
        wandb_dir = log_to_wandb(out, runs, groups, figures, tables)
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
    parser.add_argument("--budget", type=float, default=None,
                        help="a KL level the equal-drift table always shows (default: the "
                             "runs' common kl.target)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        report = build_report(args.paths, args.out, args.wandb, args.budget)
    except FileNotFoundError as err:
        print(f"klsweep.report: error: {err}", file=sys.stderr)
        return 2
    print(f"klsweep.report: wrote {report}, {report.parent / 'runs.csv'} and figures in "
          f"{time.perf_counter() - started:.1f} s")
    return 0
