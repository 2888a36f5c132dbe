"""The report's own W&B run (job_type=report, in the sweep's group): the runs.csv and group
tables, and the figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from klsweep.report.markdown import CSV_COLUMNS
from klsweep.report.runs import GROUP_METRICS, Group, Run, ranked_groups


def log_to_wandb(out: Path, runs: Sequence[Run], groups: Sequence[Group],
                 figures: dict[str, str],
                 tables: Mapping[str, tuple[list[str], list[list[Any]]]] | None = None) -> str:
    """Log the comparison table, ``tables`` ({name: (columns, rows)}, as report/<name>) and
    the figures to one W&B run of job_type=report in the sweep's group; return its local
    dir."""
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
    for name, (columns, data) in (tables or {}).items():
        payload[f"report/{name}"] = wandb.Table(columns=columns, data=data)
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
