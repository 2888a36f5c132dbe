"""``python -m klsweep [overrides]``: check the command line, then hand it to Hydra."""

from __future__ import annotations

from klsweep import _lean_imports

# klsweep's own process, before anything imports Lightning: importing the library changes
# nothing in its user's process
_lean_imports.install()

import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from klsweep.config import (
    CONF_DIR,
    ConfigError,
    check_overrides,
    compose_and_validate,
    options_help,
)
from klsweep.errors import RunFailed
from klsweep.slurm import step_mismatch, step_tasks

# Flags after which Hydra prints and exits without running a job.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve",
               "--shell-completion", "-sc", "--version"}
_HELP_FLAGS = {"--help", "-h"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}
_HELP_HEADER = """klsweep: KL-regularised policy optimisation (PPO, DPO, GRPO) with every KL
estimator and β schedule, swept by Hydra and Optuna.

  python -m klsweep algo=grpo kl.target=0.05                    one run
  python -m klsweep -m algo=grpo,ppo schedule=fixed,adaptive    a grid
  python -m klsweep -m sweep=beta_target                        an Optuna study
  python -m klsweep.report sweeps/<dir>                         compare runs
  python -m klsweep [overrides] --help                          this help, for those overrides
  python -m klsweep --hydra-help                                Hydra's own flags
"""
_MAX_GRID_CHECK = 256


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    from klsweep.swept import sweep_job
    from klsweep.train import train

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweeper records a trial's failure
        with console_left_to_sweep(hydra_cfg):
            return train(cfg, Path(hydra_cfg.runtime.output_dir), sweep=sweep_job(hydra_cfg))
    try:
        return train(cfg, Path(hydra_cfg.runtime.output_dir))
    except ConfigError as err:  # resume=... that cannot be resumed: nothing was written
        print(f"klsweep: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:  # its summary line, reason included, is already printed
        sys.exit(err.exit_code)


# klsweep's sweeper and launcher print a line for each job that starts and ends
_REPORTING_PLUGINS = ("hydra_plugins.klsweep_optuna.", "hydra_plugins.klsweep_local.")


@contextmanager
def console_left_to_sweep(hydra_cfg: DictConfig) -> Iterator[None]:
    """A job whose sweep prints its events keeps its own INFO lines (its summary line) to its
    log file, so that jobs running at once do not write over the sweep's lines; its warnings
    and errors still reach the console. Restored after the job, for a launcher that runs
    jobs in the sweep's own process."""
    targets = (hydra_cfg.sweeper.get("_target_") or "", hydra_cfg.launcher.get("_target_") or "")
    consoles = [] if not any(t.startswith(_REPORTING_PLUGINS) for t in targets) else [
        h for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [handler.level for handler in consoles]
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels, strict=True):
            handler.setLevel(level)


def precheck(args: list[str]) -> None:
    """Validate every job the command line describes before Hydra creates a run dir."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    combos = check_overrides(overrides)
    for combo in combos[:_MAX_GRID_CHECK]:
        cfg = compose_and_validate(combo)
        if not _MULTIRUN_FLAGS.intersection(args):  # a sweep's trials are checked by its launcher
            check_slurm_step(cfg, overrides)


def check_slurm_step(cfg: DictConfig, overrides: list[str]) -> None:
    """A run started by ``srun``: its tasks are its ranks, one per device (a task too many
    would train a copy of the run, one too few would leave the others waiting for it), and
    they write one run dir, which the clock in the default dir's name would not give them."""
    mismatch = step_mismatch(cfg.trainer.devices, cfg.trainer.num_nodes)
    if mismatch is not None:
        raise ConfigError(mismatch)
    tasks = step_tasks()
    if tasks and tasks > 1 and not any(o.startswith("hydra.run.dir=") for o in overrides):
        raise ConfigError(f"srun started {tasks} tasks of this run: give them one run dir, e.g. "
                          f"hydra.run.dir=runs/$SLURM_JOB_ID (each task would name its own from "
                          f"its clock, and a requeued job resumes from that dir)")


def print_help(args: list[str]) -> None:
    """Every option of the config the overrides compose, with its help line."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    combos = check_overrides(overrides)
    print(_HELP_HEADER)
    print(options_help(compose_and_validate(combos[0])))


def main() -> None:
    args = sys.argv[1:]
    if _HELP_FLAGS.intersection(args):
        try:
            print_help(args)
        except ConfigError as err:
            print(f"klsweep: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    if not _INFO_FLAGS.intersection(args):
        try:
            precheck(args)
        except ConfigError as err:
            # every task of an srun step finds the same error: the first one says it
            if os.environ.get("SLURM_PROCID", "0") == "0" or not step_tasks():
                print(f"klsweep: error: {err}", file=sys.stderr)
            sys.exit(2)
    # Everything imported lives until the process ends: frozen, it is left out of every
    # collection (a full one scans ~340k objects, 0.1 s) and out of the one at exit (0.5 s)
    gc.freeze()
    hydra_main()


if __name__ == "__main__":
    main()
