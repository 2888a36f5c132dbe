"""Where a whole run's wall time goes (``python -m klsweep.bench --shares [overrides]``): the
real command's run (``train``) in a temporary run dir, with the reference's training (SFT or
maximum likelihood, on first use) and the task's evaluations timed apart from the updates.

By default the reference cache is a fresh temporary dir, so the reference is trained as on a
first run; ``--warm`` uses the configured cache, as every later run and every sweep trial
but the first does.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from klsweep.config import compose_and_validate
from klsweep.models import reference
from klsweep.records import read_metrics


def measure_shares(overrides: list[str], warm: bool = False) -> dict[str, Any]:
    """Run the configured run once; return its wall time and the seconds and shares of the
    reference's training, the evaluations and the rest (the updates, logging, start-up)."""
    from klsweep.train import train

    values = dict(o.split("=", 1) for o in overrides)
    values.setdefault("logger", "none")
    values.setdefault("trainer.enable_progress_bar", "false")
    with tempfile.TemporaryDirectory() as tmp:
        if not warm:
            values["task.cache_dir"] = str(Path(tmp) / "cache")
        cfg = compose_and_validate(values)
        trained: list[float] = []
        original = reference.train_language_model

        def timed(*args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            original(*args, **kwargs)
            trained.append(time.perf_counter() - started)

        reference.train_language_model = timed  # the closure in pretrained_reference reads it
        try:
            (Path(tmp) / "run").mkdir()
            started = time.perf_counter()
            summary = train(cfg, Path(tmp) / "run")
            wall = time.perf_counter() - started
            rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
        finally:
            reference.train_language_model = original
    sft, evaluation = sum(trained), sum(row.get("perf/eval_s", 0.0) for row in rows)
    return {"overrides": overrides, "warm": warm, "wall_s": wall, "reference_s": sft,
            "evaluation_s": evaluation, "rest_s": wall - sft - evaluation,
            "reference_share": sft / wall, "evaluation_share": evaluation / wall,
            "evaluations": sum(1 for row in rows if "perf/eval_s" in row),
            "steps": len(rows), "status": summary["status"]}


def shares_report(result: dict[str, Any]) -> str:
    lines = [f"klsweep.bench --shares {' '.join(result['overrides'])}"
             f"{' --warm' if result['warm'] else ''}: {result['status']}, "
             f"{result['steps']} steps, {result['evaluations']} evaluations",
             f"{'part':<26}{'seconds':>10}{'share':>9}"]
    for label, key in (("reference training", "reference"), ("evaluation", "evaluation"),
                       ("updates and the rest", "rest")):
        seconds = result[f"{key}_s"]
        lines.append(f"{label:<26}{seconds:>10.1f}{seconds / result['wall_s']:>9.1%}")
    lines.append(f"{'wall time':<26}{result['wall_s']:>10.1f}{1:>9.0%}")
    return "\n".join(lines)
