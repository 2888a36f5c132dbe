"""Record the golden replays of tests/test_same_numbers.py for this machine's kind of CPU: run
each of its commands with the code as it was before the policy pair and the model seam
(a git worktree of that commit, its own fresh reference-model cache) and keep every logged
value but the perf/* timings in tests/data/before_seam/<cpu kind>/.

    python scripts/record_before_seam.py          # from the repository root: every command
    python scripts/record_before_seam.py ppo      # only the commands named
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_same_numbers import BEFORE, BEFORE_COMMIT, COMMANDS, cpu_kind  # noqa: E402


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(COMMANDS))
    if unknown:
        sys.exit(f"record_before_seam: unknown command {', '.join(unknown)} "
                 f"(allowed: {', '.join(COMMANDS)})")
    out_dir = BEFORE / cpu_kind()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                        BEFORE_COMMIT], check=True, capture_output=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree / "src"),
                   "KLSWEEP_CACHE": str(Path(tmp) / "cache"), "WANDB_MODE": "offline"}
            for name, overrides in COMMANDS.items():
                if names and name not in names:
                    continue
                run_dir = Path(tmp) / "runs" / name
                subprocess.run([sys.executable, "-m", "klsweep", *overrides, "logger=none",
                                f"hydra.run.dir={run_dir}"], cwd=tree, env=env, check=True)
                rows = [json.loads(line) for line in
                        (run_dir / "metrics.jsonl").read_text().splitlines()]
                kept = [{k: v for k, v in row.items() if not k.startswith("perf/")}
                        for row in rows]
                (out_dir / f"{name}.jsonl").write_text(
                    "".join(json.dumps(row) + "\n" for row in kept))
                print(f"{out_dir / name}.jsonl: {len(kept)} steps")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
