"""The audit's record in its run dir: audit.json (every row and what it was measured at),
audit.md (the table, standard errors beside each Monte Carlo figure), audit.png (rel_bias
per way of forming the KL term, one bar per target) and, with logger=wandb, the same table
as a W&B Table (offline unless credentials are configured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("estimator", "placement", "gradient", "is_correction", "unit", "follows", "accepted",
           "target", "rel_bias", "cosine", "variance", "mse_at_batch")
FIGURES = ("rel_bias", "cosine", "variance", "mse_at_batch")


def _cell(row: dict[str, Any], key: str, sampled: bool) -> str:
    value = row[key]
    if key not in FIGURES:
        return str(value).lower() if isinstance(value, bool) else str(value)
    se = row.get(f"{key}_se", 0.0)
    return f"{value:.4g} ± {se:.2g}" if sampled or (key == "variance" and se) else f"{value:.4g}"


def markdown(result: dict[str, Any]) -> str:
    sampled = result["method"] == "monte_carlo"
    head = (f"# KL-gradient audit: task={result['task']} algo={result['algo']}\n\n"
            f"E[ĝ] by {result['method'].replace('_', ' ')}; variance from "
            f"{result['samples']} draws in {result['groups']} groups (± one standard error); "
            f"{result['train_steps']} updates before the audit, staleness "
            f"{result['staleness']}; mse_at_batch = rel_bias² + variance/(B·|g*|²) at "
            f"B = {result['batch_size']}; {result['parameters']:,} parameters; mean length "
            f"{result['mean_length']:.3g} tokens.\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, sampled) for k in COLUMNS) + " |"
              for r in result["rows"]]
    return head + "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> None:
    """rel_bias of every way of forming the term (token unit), one bar per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["unit"] == "token"]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    labels = list(dict.fromkeys(
        f"{r['estimator']} {r['placement']}" + (" ∇k2" if r["gradient"] == "k2" else "")
        + (" IS" if r["is_correction"] else "") for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(targets)
    for i, name in enumerate(targets):
        values = [r["rel_bias"] for r in rows if r["target"] == name]
        errors = [r["rel_bias_se"] for r in rows if r["target"] == name]
        ax.bar([x + i * width for x in range(len(labels))], values, width, yerr=errors,
               label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=70,
                  fontsize=7)
    ax.set_ylabel("rel_bias = |E ĝ − g*| / |g*|")
    ax.set_title(f"Bias of the KL term's expected gradient ({result['method']}, "
                 f"task={result['task']}, staleness {result['staleness']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def wandb_table(result: dict[str, Any], run_dir: Path, config: dict[str, Any]) -> str:
    """The rows as a W&B Table ``audit`` in a run of job type ``audit``; returns its dir."""
    import wandb

    from klsweep.records import wandb_mode

    keys = [*COLUMNS, *(f"{k}_se" for k in FIGURES)]
    table = wandb.Table(columns=list(keys), data=[[r[k] for k in keys] for r in result["rows"]])
    run = wandb.init(project="klsweep", job_type="audit", dir=str(run_dir), config=config,
                     mode=wandb_mode("auto"))
    run.log({"audit": table})
    directory = run.dir
    run.finish()
    return directory


def write(result: dict[str, Any], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "audit.json").write_text(json.dumps(result, indent=1))
    (run_dir / "audit.md").write_text(markdown(result))
    figure(result, run_dir / "audit.png")
