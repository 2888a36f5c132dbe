"""The Slurm cluster that the slurm-marked tests submit to: the one ``$SLURM_CONF`` names, else
the one ``scripts/slurm_local.sh start`` keeps at its default place, else this machine's own
Slurm configuration. Found once, at collection; without one the tests skip and say why."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_DEFAULT_DIR = os.environ.get("KLSWEEP_SLURM_DIR") or os.path.join(
    os.environ.get("TMPDIR") or "/tmp", "klsweep-slurm")
NO_CLUSTER = ("no Slurm cluster: scripts/slurm_local.sh start brings one up on this machine "
              "(.ci/run does)")


def find_cluster() -> tuple[dict[str, str] | None, str]:
    """The environment to run Slurm's commands with (SLURM_CONF set when a file names the
    cluster), or None and why there is none."""
    if shutil.which("sinfo") is None:
        return None, f"Slurm's commands are not installed (apt-get install slurm-wlm munge); " \
                     f"{NO_CLUSTER}"
    conf = os.environ.get("SLURM_CONF")
    if conf is None and Path(_DEFAULT_DIR, "slurm.conf").exists():
        conf = str(Path(_DEFAULT_DIR, "slurm.conf"))
    env = {**os.environ, **({"SLURM_CONF": conf} if conf else {})}
    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=env,
                              capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None, f"sinfo did not answer in 10 s; {NO_CLUSTER}"
    states = set(done.stdout.split())
    if done.returncode != 0 or not states & {"idle", "mix", "alloc"}:
        said = (done.stderr.strip().splitlines() or [f"node states {sorted(states)}"])[-1]
        return None, f"{said}; {NO_CLUSTER}"
    return env, ""


SLURM_ENV, _WHY_NOT = find_cluster()
needs_cluster = pytest.mark.skipif(SLURM_ENV is None, reason=_WHY_NOT)
