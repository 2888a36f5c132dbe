"""The exact task's gain left (``exact/improvement_left_final``, the last quarter's mean of
(J* − J)/(J* − J_ref)) of ``python -m klsweep task=exact algo=grpo`` at ``rollout.lag`` 0, 1,
2 and 4, with each correction of the policy-gradient term (``rollout.correction``) and with
the KL term's (``kl.is_correction``) forms, as a Markdown table: the table of
docs/research/off-policy-kl.md.

    python scripts/off_policy_exact.py --jobs 2 --seeds 0 1 2 > table.md

The KL forms that the audit's table says follow no target off-policy (k3 alone, k3 with the
token's ratio) are refused by training at a lag; ``--refused`` measures them anyway, in a
process whose refusal is lifted (the evidence for refusing them, as ``audit.refused=true``
is the audit's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["task=exact", "algo=grpo", "logger=none", "trainer.enable_progress_bar=false"]
PG_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask",
            "decoupled")
LAGS = (0, 1, 2, 4)
# the KL term's forms besides auto (sequence at a lag): the token's ratio, and none
KL_FORMS = {"kl: token ratio": "kl.is_correction=true", "kl: none": "kl.is_correction=false"}
# ``python -m klsweep`` with the audit table's off-policy refusal lifted in its process
LIFTED = ("import sys; import klsweep.kl.forms as forms; "
          "forms.stale_refusal = lambda form, lag: None; "
          "from klsweep.__main__ import main; sys.argv[0] = 'klsweep'; main()")


def cells(refused: bool) -> list[tuple[str, int, list[str]]]:
    """(column, lag, overrides) of every run of the table."""
    out = [("none", 0, ["rollout.lag=0"]), ("kl: none", 0, ["kl.is_correction=false"])]
    # at lag 0 the native engine's samples are the trainer's own: no weight to correct
    for lag in LAGS[1:]:
        for mode in PG_MODES:
            out.append((mode, lag, [f"rollout.lag={lag}", f"rollout.correction={mode}"]))
        if refused:
            for column, override in KL_FORMS.items():
                out.append((column, lag, [f"rollout.lag={lag}", override]))
    return out


def run(overrides: list[str], seed: int, lifted: bool) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        command = ([sys.executable, "-c", LIFTED] if lifted else
                   [sys.executable, "-m", "klsweep"])
        result = subprocess.run([*command, *BASE, *overrides, f"seed={seed}",
                                 f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True,
                                text=True, env={**os.environ, "WANDB_MODE": "offline"})
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{' '.join(overrides)} seed={seed}: {tail}")
        return json.loads((Path(run_dir) / "summary.json").read_text())[
            "exact/improvement_left_final"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--refused", action="store_true",
                        help="also the KL forms training refuses at a lag")
    parser.add_argument("--json", type=Path, help="also write every run's figure here")
    args = parser.parse_args()
    todo = [(column, lag, overrides, seed) for column, lag, overrides in cells(args.refused)
            for seed in args.seeds]
    load = os.getloadavg()[0]
    with ThreadPoolExecutor(args.jobs) as pool:
        figures = list(pool.map(lambda c: run(c[2], c[3], lifted=c[0] in KL_FORMS and c[1] > 0),
                                todo))
    results: dict[tuple[str, int], list[float]] = {}
    for (column, lag, _, _), value in zip(todo, figures, strict=True):
        results.setdefault((column, lag), []).append(value)
    if args.json:
        args.json.write_text(json.dumps({f"{c}@{lag}": v for (c, lag), v in results.items()}))
    columns = list(dict.fromkeys(column for column, _ in results))
    print(f"`exact/improvement_left_final`, mean over seeds {args.seeds} "
          f"(± spread where several); load average {load:.1f} at the start\n")
    print("| rollout.lag | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for lag in LAGS:
        row = []
        for column in columns:
            values = results.get((column, lag))
            if not values:
                row.append("—")
            elif len(values) == 1:
                row.append(f"{values[0]:.3f}")
            else:
                row.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        print(f"| {lag} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
