"""The local record of a run (metrics.jsonl, summary.json) and its W&B logger.

metrics.jsonl has one JSON object per step with the same keys as W&B's history; summary.json
holds the final metrics, the status and the versions. The report reads only these files.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import platform
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from klsweep.metrics import MEAN, final_keys, final_name, find
from klsweep.schema import spec

log = logging.getLogger("klsweep")

# The share of the run, at the end, whose mean is a run's final value: a single step is too
# noisy to rank runs by.
FINAL_FRACTION = 0.25
# the logged keys whose last-quarter mean summary.json keeps (klsweep.metrics declares which)
FINAL_KEYS = final_keys(MEAN)


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
    def log_samples(self, name: str, rows: list[dict[str, Any]]) -> None:
        """An evaluation's samples, one JSON object a line, in ``samples/<name>.jsonl``
        beside metrics.jsonl (written whole, atomically: a resumed run rewrites the same)."""
        write_jsonl(self.path.parent / "samples" / f"{name}.jsonl", rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as JSON lines, atomically; values JSON lacks (a dataset's own types in an
    entry's metadata) as their text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(row, default=str, allow_nan=True) + "\n" for row in rows))
    os.replace(tmp, path)


# the columns of an evaluation's samples in W&B's table (the JSON lines hold every field)
SAMPLE_COLUMNS = ("question", "completion", "extracted_answer", "score", "answer")


def log_sample_table(logger: Logger, name: str, rows: list[dict[str, Any]], step: int) -> None:
    """An evaluation's samples as a W&B table ``samples/<name>`` (other loggers keep none)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    data = [[row.get("question"), row.get("completion"), row.get("extracted_answer"),
             row.get("score"), str(row.get("entry", {}).get("answer"))] for row in rows]
    logger.log_table(key=f"samples/{name}", columns=list(SAMPLE_COLUMNS), data=data, step=step)


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def resume_metrics(path: Path, before_step: int, *, rewrite: bool) -> tuple[list[dict], int]:
    """The rows of ``path`` before ``before_step`` (a resumed run's history), and the last
    step the file held. With ``rewrite``, the file is cut back to those rows atomically, so
    the resumed run appends each later step exactly once. A kill can leave half a last line:
    it is dropped."""
    if not path.exists():
        return [], -1
    rows, broken = [], 0
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            broken += 1
    kept = [row for row in rows if row["step"] < before_step]
    if rewrite and (broken or len(kept) != len(rows)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(row, allow_nan=True) + "\n" for row in kept))
        os.replace(tmp, path)
    return kept, max((row["step"] for row in rows), default=-1)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's summary.json, or None when it has none (or half of one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def final_mean(rows: list[dict[str, float]], key: str,
               fraction: float = FINAL_FRACTION) -> float:
    """Mean of ``key`` over the last ``fraction`` of the rows that have it (at least one)."""
    values = [row[key] for row in rows if key in row]
    if not values:
        return math.nan
    tail = values[-max(1, math.ceil(len(values) * fraction)):]
    return float(sum(tail) / len(tail))


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Final metrics of a run, as ``klsweep.metrics`` declares each: ``X/final`` is the
    last-quarter mean of ``X/mean`` (``kl/seq_final`` of ``kl/seq``, etc.); ``kl/beta_final``
    is the last β and ``exact/X_final`` the last logged ``exact/X``."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        metric = find(key)
        if metric is None or metric.final is None:
            continue
        if metric.final == MEAN:
            value = final_mean(rows, key)
            if not math.isnan(value):  # a key that was never a number
                out[final_name(key)] = value
        else:
            out[final_name(key)] = next(row[key] for row in reversed(rows) if key in row)
    return out


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    # from the installed packages' metadata: importing wandb only for its version took 0.5 s
    # of every run without the W&B logger
    from importlib.metadata import version

    packages = {"klsweep": "klsweep", "torch": "torch", "lightning": "lightning",
                "hydra": "hydra-core", "optuna": "optuna", "wandb": "wandb"}
    return {"python": platform.python_version(),
            **{name: version(package) for name, package in packages.items()}}


def wandb_base_url() -> str:
    """The W&B server a run would talk to: ``WANDB_BASE_URL``, else wandb's default."""
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def wandb_credentials_present() -> bool:
    """An API key in the environment or the netrc entry that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlsplit(wandb_base_url()).hostname) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


# Seconds a run waits to learn whether the W&B server is there: wandb's own online start
# waits init_timeout (90 s) before it gives up, minutes per sweep when the network is down.
REACH_TIMEOUT_S = 2.0
# A server that accepts the connection but fails or does not answer: wandb's start gives up
# after this (measured: 15.6 s, then offline within a second).
INIT_TIMEOUT_S = 15.0


def wandb_reachable(base_url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds; nothing
    is sent, and nothing but that host (and its name's lookup) is contacted. The lookup is
    not bound by a socket timeout, so the probe runs in a thread that is waited for at most
    ``timeout``."""
    url = urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="klsweep-wandb-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def wandb_run_id(run_dir: Path, resumed_id: str | None) -> str:
    """The W&B run id of the run in ``run_dir``: a resumed run's own, else a new one; kept in
    ``run_dir/wandb_id`` (the checkpoint holds it too, for ``resume=<another dir>``)."""
    run_id = resumed_id or uuid.uuid4().hex[:8]
    (run_dir / "wandb_id").write_text(run_id + "\n")
    return run_id


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
    run_id: str
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
        return make_wandb_logger(run_dir=run.run_dir, run_id=run.run_id, project=self.project,
                                 group=self.group or run.group, name=run.name,
                                 job_type=run.job_type, tags=run.tags, config=run.config,
                                 mode=wandb_mode(self.mode))


@dataclass
class CSVLoggerConfig:
    """``logger=csv``: Lightning's CSVLogger in the run dir, beside the local record."""

    def build(self, run: RunIdentity) -> Logger:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(run.run_dir, name="csv")


def make_wandb_logger(*, run_dir: Path, run_id: str, project: str, group: str | None,
                      name: str, job_type: str, tags: list[str], config: dict[str, Any],
                      mode: str):
    """A started WandbLogger on run ``run_id`` (a resumed run continues its W&B run). An
    online start that cannot reach the server, or fails, falls back to offline within
    seconds, so a run never fails or waits for W&B."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(project=project, group=group, name=name, job_type=job_type, tags=tags,
                  save_dir=str(run_dir), config=config, id=run_id, resume="allow",
                  settings=wandb.Settings(silent=True, init_timeout=INIT_TIMEOUT_S))
    if mode == "online" and not wandb_reachable(wandb_base_url()):
        log.warning(f"klsweep: W&B at {wandb_base_url()} is unreachable: logging offline "
                    f"(wandb sync {run_dir / 'wandb'} uploads it later)")
        mode = "offline"
    try:
        logger = _started(WandbLogger(mode=mode, **kwargs))
    except Exception as err:
        if mode == "offline":
            raise
        log.warning(f"klsweep: W&B did not start online ({type(err).__name__}): logging "
                    f"offline")
        wandb.teardown()  # else the failed start keeps the run id, and the offline one fails
        logger = _started(WandbLogger(mode="offline", **kwargs))
    define_step_metrics(logger.experiment)
    return logger


def start_wandb_service() -> None:
    """Import W&B with the modules its first run imports, and start its service, in a process
    about to fork runs: each forked run finds them loaded and connects to this service (W&B's
    way for child processes) instead of spending ~1.9 s on them (measured on 2 CPU cores: the
    import 0.5 s, wandb.sdk.launch, which wandb.init imports, 1.0 s, the service 0.2 s)."""
    import wandb

    # the service starts while the launch modules import: its start is mostly waiting
    starting = threading.Thread(target=wandb.setup, name="klsweep-wandb-setup")
    starting.start()
    import wandb.sdk.launch  # noqa: F401

    starting.join()


def _started(logger):
    # Lightning always passes wandb's deprecated ``anonymous`` argument, which wandb answers
    # with a warning the user can do nothing about.
    logger._wandb_init.pop("anonymous", None)
    _ = logger.experiment
    return logger
