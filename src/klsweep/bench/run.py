"""The run: the real training loop (Lightning, the module, sampling with the KV cache, the
reference pass, the update, logging) on the shape of DESIGN §11, its steps timed by phase,
the FLOPs of one warm-up step counted, and optionally some steps profiled."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from klsweep.bench.flops import PhaseFlops
from klsweep.bench.record import kernel_times, summarize
from klsweep.bench.roofline import roofline
from klsweep.bench.timing import PhaseClock, timed_phases
from klsweep.config import compose_and_validate
from klsweep.models import build_models
from klsweep.models.tiny import TinyConfig, untrained_tiny
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import from_node
from klsweep.tasks.base import Task
from klsweep.train import build_module

# Each algorithm's benchmark batch (DESIGN §11), before the command line's overrides.
PRESETS = {"grpo": [], "ppo": [], "dpo": ["algo.pairs_per_step=32"]}
PROMPT_LEN, MAX_NEW_TOKENS, VOCAB = 8, 16, 32


class SpeedTask(Task):
    """Random prompts, a cheap reward, and no EOS, so that every completion has exactly
    ``max_new_tokens`` tokens and the token count is the nominal one (``eos_id``: an EOS the
    model can sample, for an engine that takes only ids of the model's vocabulary; the
    prompts then avoid it)."""

    name = "speed"

    def __init__(self, vocab_size: int, prompt_len: int, max_new_tokens: int,
                 eos_id: int | None = None) -> None:
        self.vocab_size = vocab_size if eos_id is None else eos_id
        self.eos_id = vocab_size if eos_id is None else eos_id  # never sampled (None)
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        return Prompts.unpadded(torch.randint(0, self.vocab_size, (n, self.prompt_len),
                                              generator=generator))

    def reward(self, rollout: Rollout) -> Tensor:
        return ((rollout.completions % 2 == 0) & rollout.mask).float().mean(1)


class StepLog(L.Callback):
    """Marks the end of every training step (so that a step's time is the whole loop's,
    Lightning included), takes each step's phase times, times the optimiser's ``step`` by
    hooks, and counts the FLOPs of step ``count_step``."""

    def __init__(self, clock: PhaseClock, count_step: int, profile_from: int | None) -> None:
        self.clock, self.count_step, self.profile_from = clock, count_step, profile_from
        self.ends: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.counted = PhaseFlops(clock)
        self.profiler = torch.profiler.profile() if profile_from is not None else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_pre_hook(lambda *_: self.clock.enter("optimiser"))
            optimizer.register_step_post_hook(lambda *_: self.clock.exit())
        self.ends.append(time.perf_counter())

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.count_step:
            self.counted.__enter__()
        if batch_idx == self.profile_from:
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx == self.count_step:
            self.counted.__exit__(None, None, None)
        self.ends.append(time.perf_counter())
        self.phases.append(self.clock.take())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def _config(algo: str, steps: int, overrides: list[str]) -> Any:
    values = dict(o.split("=", 1) for o in PRESETS.get(algo, []) + overrides)
    return compose_and_validate({"algo": algo, "schedule": "fixed", "logger": "none",
                                 "trainer": "cpu" if not torch.cuda.is_available() else "gpu",
                                 "steps": str(steps), **values})


def _models(cfg: Any, task: SpeedTask) -> tuple[nn.Module, nn.Module]:
    """A fresh policy and its copy as the frozen reference (no reference training); with
    ``model=hf``, the checkpoint ``model.name`` and its copy."""
    if cfg.model.kind == "hf":
        return build_models(cfg.model, task)
    return untrained_tiny(from_node(TinyConfig, cfg.model), task.vocab_size,
                          task.prompt_len + task.max_new_tokens)


def speed_task(cfg: Any, prompt_len: int, new_tokens: int) -> SpeedTask:
    """The benchmark's task: the tiny model's vocabulary, or the checkpoint's (its last id
    the EOS, which a rollout engine may be told to stop at)."""
    if cfg.model.kind != "hf":
        return SpeedTask(VOCAB, prompt_len, new_tokens)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(cfg.model.name).vocab_size
    return SpeedTask(vocab, prompt_len, new_tokens, eos_id=vocab - 1)


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(algo: str, steps: int, warmup: int, threads: int, overrides: list[str],
            profile: int = 0, *, counted: bool = True, prompt_len: int = PROMPT_LEN,
            new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Train ``warmup + steps (+ profile)`` steps; time ``steps`` after the warm-up; count
    and time the FLOPs of the last warm-up step (unless ``counted`` is false); profile the
    ``profile`` steps after them."""
    if warmup < 1:
        raise ValueError("--warmup must be >= 1: a warm-up step is the one whose FLOPs count")
    torch.set_num_threads(threads)
    cfg = _config(algo, warmup + steps + profile, overrides)
    task = speed_task(cfg, prompt_len, new_tokens)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, task, _models(cfg, task))
    clock = PhaseClock()
    log = StepLog(clock, count_step=warmup - 1 if counted else -1,
                  profile_from=warmup + steps if profile else None)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator=cfg.trainer.accelerator, devices=1,
                        precision=cfg.trainer.precision, callbacks=[log])
    try:
        with timed_phases(module, clock):
            trainer.fit(module)
    finally:
        module.pair.close()  # an engine's own process (rollout.lag)
    peak_mib = _peak_memory_mib()
    measured = slice(warmup, warmup + steps)
    record = summarize(algo, cfg, task, module.history[measured],
                       log.ends[warmup:warmup + steps + 1], log.phases[measured], threads,
                       peak_mib, roofline(log.counted) if counted else {})
    if profile:
        wall_s = log.ends[-1] - log.ends[warmup + steps]
        record["kernels"] = kernel_times(log.profiler, wall_s, profile)
    return record
