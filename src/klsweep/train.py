"""One run: build the objects the config names, fit, write the record, return the final
metrics (the values a sweeper optimises)."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from optuna import TrialPruned
from torch import nn

from klsweep.algos import ALGORITHMS
from klsweep.checkpoint import (
    GracefulStop,
    Resume,
    ResumeError,
    RunCheckpoint,
    plan_resume,
    run_settings,
)
from klsweep.config import build_schedule, settle, validate
from klsweep.engines import build_engine
from klsweep.engines.correction import resolve
from klsweep.errors import RunFailed
from klsweep.metrics import check_summary
from klsweep.models import build_models, default_lr, export_policy, load_tokenizer
from klsweep.module import KLPolicyModule
from klsweep.policy import PolicyPair, kl_settings
from klsweep.progress import StepProgressBar
from klsweep.records import (
    JsonlLogger,
    RunIdentity,
    WandbLoggerConfig,
    resume_metrics,
    start_wandb_service,
    summarize,
    versions,
    wandb_run_id,
    write_json,
)
from klsweep.schema import from_node
from klsweep.sharding import is_sharded
from klsweep.swept import SweepJob, run_tags
from klsweep.swept import run_name as name_with_values
from klsweep.tasks import Task, build_task
from klsweep.tracking import run_tracking
from klsweep.trainer import trainer_arguments

log = logging.getLogger("klsweep")


# the keys that the default name shows: a sweep over them adds nothing more to it
NAMED_KEYS = ("algo", "estimator", "kl.estimator", "schedule", "seed")


def run_name(cfg: DictConfig, sweep: SweepJob | None = None) -> str:
    """``name``, else ``algo-estimator-schedule-s<seed>`` followed, in a sweep, by the swept
    values that this does not show (``grpo-k1-fixed-s0 divergence=js beta=0.1``)."""
    if cfg.name:
        return cfg.name
    base = f"{cfg.algo.name}-{cfg.kl.estimator}-{cfg.kl.schedule.name}-s{cfg.seed}"
    return name_with_values(base, sweep.values, NAMED_KEYS) if sweep else base


def optim_settings(cfg: DictConfig) -> DictConfig:
    """The ``optim`` node with its learning rate filled in: ``optim.lr: null`` is the
    model's own default (``model.lr``; model=hf: by pretrained, LoRA or from scratch)."""
    optim = cfg.optim.copy()
    if optim.lr is None:
        optim.lr = default_lr(cfg.model)
    return optim


def build_module(cfg: DictConfig, task: Task | None = None,
                 models: tuple[nn.Module, nn.Module] | None = None) -> KLPolicyModule:
    """Config → task, policy pair, algorithm and schedule → the LightningModule. ``task`` and
    ``models`` replace the ones the config names (the benchmark's)."""
    task = task or build_task(cfg.task, load_tokenizer(cfg.model), cfg.eval)
    policy, reference = models or build_models(cfg.model, task)
    engine = build_engine(cfg.rollout, cfg.model, policy, max_new_tokens=task.max_new_tokens,
                          eos_id=task.eos_id, seed=cfg.seed)
    rollout = cfg.rollout
    correction, cap = resolve(rollout.correction, rollout.tis_cap, rollout.lag)
    pair = PolicyPair(policy, reference, kl_settings(cfg.kl, rollout.lag),
                      temperature=rollout.temperature,
                      max_new_tokens=task.max_new_tokens, eos_id=task.eos_id, engine=engine,
                      sync_every=rollout.sync_every, correction=correction, cap=cap,
                      lag=rollout.lag)
    algorithm = ALGORITHMS[cfg.algo.name]
    return KLPolicyModule(pair, task, algorithm(from_node(algorithm.Config, cfg.algo)),
                          build_schedule(cfg.kl), steps=cfg.steps, seed=cfg.seed,
                          optim=optim_settings(cfg), kl_target=cfg.kl.target, kl_max=cfg.kl.max)


def build_loggers(cfg: DictConfig, run_dir: Path, sweep: SweepJob | None,
                  run_id: str) -> list[Logger]:
    """The local record, and the experiment logger that ``logger._target_`` names: in a
    sweep, its W&B run is in the sweep's group and tagged with the swept values too."""
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.logger.get("_target_") is not None:
        tags = [cfg.algo.name, cfg.kl.estimator, cfg.kl.schedule.name, cfg.task.name]
        run = RunIdentity(run_dir=run_dir, run_id=run_id, name=run_name(cfg, sweep),
                          group=sweep.group if sweep else None, job_type=cfg.algo.name,
                          tags=tags + run_tags(sweep.values) if sweep else tags,
                          config=OmegaConf.to_container(cfg, resolve=True))
        loggers.append(instantiate(cfg.logger).build(run))
    return loggers


def prepare_to_fork(cfg: DictConfig) -> None:
    """Load once, in a process about to fork runs (hydra/launcher=klsweep_local), what each
    run would otherwise load for itself: W&B, and its service, which the forked runs share."""
    if cfg.logger.get("_target_") is not None and isinstance(instantiate(cfg.logger),
                                                             WandbLoggerConfig):
        start_wandb_service()


def build_callbacks(cfg: DictConfig, checkpoints: RunCheckpoint,
                    progress_bar: bool) -> list[Callback]:
    callbacks: list[Callback] = [checkpoints]
    if progress_bar:
        callbacks.append(StepProgressBar())
    if cfg.trial.storage:  # a trial of an Optuna sweep: report to its pruner
        from klsweep.pruning import TrialPruning

        callbacks.append(TrialPruning(cfg.trial.storage, cfg.trial.study_name, cfg.trial.number))
    return callbacks


def continue_record(module: KLPolicyModule, run_dir: Path, resume: Resume,
                    rank_zero: bool) -> None:
    """Give a resumed module its history: the rows of metrics.jsonl before the checkpoint's
    step. Rank 0 cuts the run dir's file back to them (a fresh run: to nothing), or copies
    them from the run dir resumed, so that each step is appended exactly once."""
    record = run_dir / "metrics.jsonl"
    source = (resume.source or run_dir) / "metrics.jsonl"
    rows, last = resume_metrics(source, resume.step, rewrite=rank_zero and source == record)
    if [row["step"] for row in rows] != list(range(resume.step)):
        raise ResumeError(f"resume: {source} does not hold every step before the checkpoint's "
                          f"step {resume.step}; resume=never starts the run over")
    if rank_zero and source != record:
        record.write_text("".join(json.dumps(row, allow_nan=True) + "\n" for row in rows))
    module.history = rows
    module.logged_until = last if resume.checkpoint is not None else -1


def train(cfg: DictConfig, run_dir: Path, sweep: SweepJob | None = None) -> dict[str, Any]:
    """Fit the configured run in ``run_dir``, resuming it as ``resume`` says; return the
    summary (also in summary.json). A run that fails or is interrupted writes its summary
    with the reason and raises; a completed run dir is not trained again. A job of a
    ``sweep`` is named and tagged by its swept values and draws no progress bar: jobs running
    at once share the console, where the sweep prints a line per job instead."""
    validate(cfg)
    settle(cfg)
    started = time.perf_counter()
    rank_zero = rank_zero_only.rank == 0  # Lightning's DDP ranks > 0 run this too
    settings = run_settings(OmegaConf.to_container(cfg, resolve=True))
    resume = plan_resume(cfg.resume, run_dir, settings)
    if resume.completed is not None:
        if rank_zero:
            log.info(f"klsweep: {resume.source} holds a completed run; nothing to train "
                     f"(resume=never trains it again)")
        return resume.completed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    module = build_module(cfg)
    if resume.checkpoint is not None:
        module.restore(resume.checkpoint, rank_zero_only.rank)
    continue_record(module, run_dir, resume, rank_zero)
    saved = resume.checkpoint["klsweep"] if resume.checkpoint is not None else {}
    run_id = wandb_run_id(run_dir, saved.get("wandb_id")) if rank_zero else ""
    loggers = build_loggers(cfg, run_dir, sweep, run_id) if rank_zero else []
    stop = GracefulStop()
    checkpoints = RunCheckpoint(run_dir, cfg.checkpoint.every, stop,
                                {"settings": settings, "wandb_id": run_id}, resume)
    progress_bar = cfg.trainer.enable_progress_bar and sweep is None
    trainer = L.Trainer(
        max_epochs=1, logger=loggers or False,
        callbacks=build_callbacks(cfg, checkpoints, progress_bar),
        default_root_dir=run_dir, enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=False, log_every_n_steps=1,
        **{**trainer_arguments(cfg.trainer, module.policy), "enable_progress_bar": progress_bar})
    # the handlers stay until the record is written: a forked job of a killed sweep gets
    # SIGTERM once per thread of its dying parent (Linux reparents it to each in turn), and
    # a second one after fit must not end the process before summary.json exists
    with stop:
        status, reason, error = "completed", None, None
        fit_started = time.perf_counter()
        try:
            if module.step_count < cfg.steps:  # else killed after its last checkpoint
                trainer.fit(module)
        except RunFailed as err:
            status, reason, error = err.status, str(err), err
        except TrialPruned as err:  # the sweep's pruner stopped this trial: not a failure
            status, reason, error = "pruned", str(err), err
        except (KeyboardInterrupt, SystemExit) as err:  # a second Ctrl-C: Lightning exits at once
            status, reason, error = "interrupted", "stopped at once by a second Ctrl-C", err
        except BaseException as err:
            status, reason, error = "failed", f"{type(err).__name__}: {err}", err
        fit_s = time.perf_counter() - fit_started
        module.pair.close()  # an engine's own process (rollout.lag) ends with the fit
        # a sharded policy is gathered by every rank to be exported, after a fit that every rank
        # completed (after a failure the ranks may not all reach the gather)
        export = error is None or not is_sharded(module.policy)
        if not rank_zero:
            if error is not None:
                raise error
            export_policy(module.policy, None)
            return {}
        try:
            module.task.finalize(module.pair, run_dir)
            if export:
                export_policy(module.policy, run_dir)
        except Exception as err:  # a run whose record fails to write has failed too
            if error is None:
                status, reason, error = "failed", f"{type(err).__name__}: {err}", err

        history = module.history
        # this invocation's throughput: a resumed run's earlier steps ran in another process
        tokens = sum(row.get("perf/tokens", 0.0) for row in history[resume.step:])
        summary: dict[str, Any] = {
            "status": status, "reason": reason, "name": run_name(cfg, sweep),
            "algo": cfg.algo.name, "estimator": cfg.kl.estimator,
            "schedule": cfg.kl.schedule.name, "placement": cfg.kl.placement,
            "divergence": cfg.kl.divergence, "task": cfg.task.name,
            "seed": cfg.seed, "lr": module.optim.lr, "steps": cfg.steps, "steps_done": len(history),
            "resumed_from_step": resume.step,
            "wall_time_s": time.perf_counter() - started, "fit_time_s": fit_s,
            "perf/tokens_per_s": tokens / fit_s if fit_s > 0 else 0.0,
            **checkpoints.timing(),
            **summarize(history),
            # the figure β steers: the configured divergence (the KL's kl/seq and kl/mean again)
            **run_tracking(history, cfg.kl.target,
                           "kl/divergence_seq" if cfg.kl.unit == "sequence" else "kl/divergence"),
            "group": cfg.logger.get("group") or (sweep.group if sweep else None),
            "swept": sweep.values if sweep else {},
            "run_dir": str(run_dir), "versions": versions(),
        }
        check_summary(summary)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(
                    {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
                summary["wandb_dir"] = logger.experiment.dir
                logger.experiment.finish(exit_code=0 if status == "completed" else 1)
        try:
            write_json(run_dir / "summary.json", summary)
        except OSError as err:  # the disk that refused a checkpoint may refuse this too
            log.error(f"klsweep: cannot write {run_dir / 'summary.json'}: {err}")
        log.info(summary_line(summary))
        if error is not None:
            raise error
        return summary


def summary_line(s: dict[str, Any]) -> str:
    return (f"klsweep: {s['name']} {s['status']} after {s['steps_done']}/{s['steps']} steps in "
            f"{s['wall_time_s']:.1f} s · reward {s.get('reward/final', float('nan')):.3f} · "
            f"KL {s.get('kl/final', float('nan')):.4f} nats/token · "
            f"β {s.get('kl/beta_final', float('nan')):.4g} · "
            f"{s['perf/tokens_per_s']:,.0f} tokens/s → {s['run_dir']}"
            + (f" ({s['reason']})" if s["reason"] else ""))
