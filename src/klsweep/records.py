"""The local record of a run (metrics.jsonl, summary.json) and its W&B logger.

metrics.jsonl has one JSON object per step with the same keys as W&B's history; summary.json
holds the final metrics, the status and the versions. The report reads only these files.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from klsweep.schema import spec

# The share of the run, at the end, whose mean is a run's final value: a single step is too
# noisy to rank runs by.
FINAL_FRACTION = 0.25
FINAL_KEYS = ("reward/mean", "kl/mean", "kl/seq", "kl/k1", "kl/k2", "kl/k3", "kl/full",
              "policy/entropy", "policy/distinct", "perf/tokens_per_s")
# Keys whose final value is their last logged value: the exact task's figures are exact, not
# noisy, and are logged only every few steps.
LAST_VALUE_PREFIXES = ("exact/",)


class JsonlLogger(Logger):
    """A Lightning logger that appends each step's metrics to ``metrics.jsonl``."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self._file = None

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> None:
        return None  # nothing to number: one record per run dir

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is in .hydra/config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        row = {"step": step, **metrics} if "step" not in metrics else dict(metrics)
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_mean(rows: list[dict[str, float]], key: str,
               fraction: float = FINAL_FRACTION) -> float:
    """Mean of ``key`` over the last ``fraction`` of the rows that have it (at least one)."""
    values = [row[key] for row in rows if key in row]
    if not values:
        return math.nan
    tail = values[-max(1, math.ceil(len(values) * fraction)):]
    return float(sum(tail) / len(tail))


def summarize(rows: list[dict[str, float]], keys: Iterable[str] = FINAL_KEYS) -> dict[str, float]:
    """Final metrics of a run: ``X/final`` is the last-quarter mean of ``X/mean`` (and
    ``kl/seq_final`` of ``kl/seq``, etc.); ``kl/beta_final`` is the last β; ``exact/X_final``
    is the last logged ``exact/X``."""
    out: dict[str, float] = {}
    for key in keys:
        value = final_mean(rows, key)
        if math.isnan(value):
            continue
        group, _, leaf = key.partition("/")
        out[f"{group}/final" if leaf == "mean" else f"{key}_final"] = value
    for row in rows:
        for key, value in row.items():
            if key.startswith(LAST_VALUE_PREFIXES):
                out[f"{key}_final"] = value
    betas = [row["kl/beta"] for row in rows if "kl/beta" in row]
    if betas:
        out["kl/beta_final"] = float(betas[-1])
    return out


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    import hydra
    import lightning
    import optuna
    import torch
    import wandb

    import klsweep

    return {"klsweep": klsweep.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "lightning": lightning.__version__,
            "hydra": hydra.__version__, "optuna": optuna.__version__, "wandb": wandb.__version__}


def wandb_credentials_present() -> bool:
    """An API key in the environment or the netrc entry that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(configured: str) -> str:
    """``WANDB_MODE`` wins; ``auto`` is online with credentials, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if configured != "auto":
        return configured
    return "online" if wandb_credentials_present() else "offline"


# Every row carries ``step`` (one policy update). Lightning's WandbLogger plots everything
# against ``trainer/global_step``; klsweep's own axis is named explicitly so that KL, β and
# reward line up across algorithms whatever Lightning counts. Exact names take precedence over
# globs in W&B, and redefining "*" replaces Lightning's default for every other key.
STEP_METRIC = "step"
STEP_PLOTTED = ("kl/mean", "kl/seq", "kl/beta", "kl/target", "reward/mean")


def define_step_metrics(run: Any) -> None:
    """Make ``step`` the x-axis of every metric of a W&B run."""
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
    for key in STEP_PLOTTED:
        run.define_metric(key, step_metric=STEP_METRIC)


@dataclass(frozen=True)
class RunIdentity:
    """What every experiment logger is told about the run it records."""

    run_dir: Path
    name: str
    group: str | None
    job_type: str
    tags: list[str]
    config: dict[str, Any]


@dataclass
class WandbLoggerConfig:
    """``logger=wandb``: Weights & Biases through Lightning's WandbLogger."""

    project: str = spec(kind="string", help="W&B project")
    group: str | None = spec(kind="string", optional=True,
                             help="W&B group; null: the sweep's name for multiruns")
    mode: str = spec(kind="choice", choices=("auto", "online", "offline"),
                     help="auto: online with credentials, else offline")

    def build(self, run: RunIdentity) -> Logger:
        return make_wandb_logger(run_dir=run.run_dir, project=self.project,
                                 group=self.group or run.group, name=run.name,
                                 job_type=run.job_type, tags=run.tags, config=run.config,
                                 mode=wandb_mode(self.mode))


@dataclass
class CSVLoggerConfig:
    """``logger=csv``: Lightning's CSVLogger in the run dir, beside the local record."""

    def build(self, run: RunIdentity) -> Logger:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(run.run_dir, name="csv")


def make_wandb_logger(*, run_dir: Path, project: str, group: str | None, name: str,
                      job_type: str, tags: list[str], config: dict[str, Any], mode: str):
    """A started WandbLogger. An online start that fails (no network) falls back to
    offline, so a run never fails for W&B."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(project=project, group=group, name=name, job_type=job_type, tags=tags,
                  save_dir=str(run_dir), config=config, settings=wandb.Settings(silent=True))
    try:
        logger = _started(WandbLogger(mode=mode, **kwargs))
    except Exception:
        if mode == "offline":
            raise
        logger = _started(WandbLogger(mode="offline", **kwargs))
    define_step_metrics(logger.experiment)
    return logger


def _started(logger):
    # Lightning always passes wandb's deprecated ``anonymous`` argument, which wandb answers
    # with a warning the user can do nothing about.
    logger._wandb_init.pop("anonymous", None)
    _ = logger.experiment
    return logger
