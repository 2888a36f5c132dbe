"""Rerun the commands behind the site's figures and write the figures into docs/figures/, each
stamped along its bottom edge with the commands that produced it and the klsweep version
(and commit) they ran.

    python scripts/docs_figures.py                  # every figure
    python scripts/docs_figures.py best_of_n        # only the figures named
    python scripts/docs_figures.py --workdir DIR    # keep the sweeps in DIR (default: a temp dir)

Each figure is a sweep of the real command and the report over it; the runs' W&B logging is
off (`logger=none`), which changes no number. The load average before and after each sweep
is printed: timings are not part of the figures, but a loaded machine makes them slow.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "figures"


@dataclass(frozen=True)
class Figures:
    """A sweep, the report over it, and which of the report's figures the site shows."""

    sweep: tuple[str, ...]  # python -m klsweep ARGS
    sweep_dir: str          # where the sweep writes its runs (relative to the work dir)
    files: dict[str, str]   # report figure -> docs/figures/ name


FIGURES = {
    "schedules": Figures(("-m", "sweep=schedules"), "sweeps/schedules",
                         {"kl_trajectories.png": "schedules_kl.png",
                          "equal_drift.png": "schedules_equal_drift.png"}),
    "overoptimization": Figures(("-m", "sweep=overoptimization", "task=exact"),
                                "sweeps/overoptimization",
                                {"overoptimization.png": "overoptimization.png"}),
    "best_of_n": Figures(("-m", "task=exact", "algo=grpo", "schedule=fixed",
                          "kl.placement=reward", "estimator=k1", "kl.beta=0.03,0.1,0.3",
                          "steps=200", "hydra.sweep.dir=sweeps/best_of_n"), "sweeps/best_of_n",
                         {"reward_vs_kl.png": "best_of_n.png"}),
}


def provenance() -> str:
    """klsweep's version and the commit it ran (``+changes`` when the tree differs)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = " +changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"klsweep {version('klsweep')} ({commit}{changed})"


def stamp(source: Path, target: Path, lines: list[str]) -> None:
    """Copy the PNG ``source`` to ``target`` with ``lines`` printed in a band below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = plt.imread(source)
    height, width = image.shape[:2]
    dpi, line_px = 100, 16
    band = line_px * (len(lines) + 1)
    fig = plt.figure(figsize=(width / dpi, (height + band) / dpi), dpi=dpi)
    fig.add_axes((0, band / (height + band), 1, height / (height + band))).imshow(image)
    fig.axes[0].set_axis_off()
    for i, line in enumerate(lines):
        fig.text(0.01, (band - line_px * (i + 1)) / (height + band), line, fontsize=8,
                 family="monospace", color="#444444", va="center")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi)
    plt.close(fig)


def run(args: list[str], workdir: Path) -> None:
    print(f"$ {shlex.join(args)}   (load {os.getloadavg()[0]:.1f})", flush=True)
    subprocess.run([sys.executable, *args], cwd=workdir, check=True,
                   env={**os.environ, "WANDB_MODE": "offline"})


def make(name: str, workdir: Path) -> None:
    figures = FIGURES[name]
    sweep = ["-m", "klsweep", *figures.sweep, "logger=none"]
    report = ["-m", "klsweep.report", figures.sweep_dir]
    ran = provenance()  # the code the sweep runs, before anything can change the tree
    run(sweep, workdir)
    run(report, workdir)
    print(f"  done (load {os.getloadavg()[0]:.1f})")
    lines = [f"python {shlex.join(sweep)}", f"python {shlex.join(report)}",
             f"{ran}; rerun: python scripts/docs_figures.py {name}"]
    for produced, shown in figures.files.items():
        stamp(workdir / figures.sweep_dir / produced, OUT / shown, lines)
        print(f"  wrote {OUT / shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"figures to make, of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--workdir", type=Path, help="where the sweeps run (default: a temp dir)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)} (known: {', '.join(FIGURES)})")
    with tempfile.TemporaryDirectory(prefix="klsweep-figures-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.names or FIGURES:
            make(name, workdir)


if __name__ == "__main__":
    main()
