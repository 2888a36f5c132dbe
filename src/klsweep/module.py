"""The LightningModule: it holds the policy pair, the algorithm and the β schedule, feeds the
algorithm a batch of prompts each step, steers β with the KL the step measured, and records
the metrics. The algorithms' steps live in ``algos/``; they see the policy pair, never this
module."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from klsweep.algos.common import Algorithm
from klsweep.errors import KLDiverged, RunFailed
from klsweep.kl import Schedule
from klsweep.policy import PolicyPair
from klsweep.rollout import Prompts
from klsweep.tasks.base import Task


class PromptStream(IterableDataset):
    """``steps`` batches of fresh prompts from the task, reproducible from ``seed``."""

    def __init__(self, task: Task, n_prompts: int, steps: int, seed: int) -> None:
        self.task, self.n_prompts, self.steps, self.seed = task, n_prompts, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield self.task.sample_prompts(self.n_prompts, generator)


class KLPolicyModule(L.LightningModule):
    def __init__(self, pair: PolicyPair, task: Task, algorithm: Algorithm, schedule: Schedule,
                 *, steps: int, seed: int, optim: Any, kl_target: float, kl_max: float) -> None:
        super().__init__()
        self.pair = pair
        # registered as submodules, so that Lightning moves them and checkpoints hold them
        self.policy = pair.policy
        self.reference = pair.reference
        self.task = task
        self.algo = algorithm
        # an algorithm's own trainable part (PPO's value head) trains beside the policy
        self.algo_module = algorithm.setup(pair, seed)
        self.schedule = schedule
        self.steps, self.seed, self.optim = steps, seed, optim
        self.kl_target, self.kl_max, self.kl_unit = kl_target, kl_max, pair.kl.unit
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []
        self.step_count = 0

    # --- data and optimiser -----------------------------------------------------------------
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        stream = PromptStream(self.task, self.algo.prompts_per_step(), self.steps,
                              self.seed + 1000 * self.global_rank)
        return torch.utils.data.DataLoader(stream, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.algo_module is not None:
            params += list(self.algo_module.parameters())
        # foreach: one fused kernel per op over all tensors; torch picks it only on CUDA, and
        # the per-tensor loop costs ~8x more per step on CPU for this model
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay, foreach=True)

    def optimize(self, loss: Tensor) -> None:
        """One optimiser step on ``loss`` (the algorithms' ``optimize``)."""
        if not torch.isfinite(loss):
            raise RunFailed(f"loss is {loss.item()} at step {self.step_count}")
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip,
                                gradient_clip_algorithm="norm")
        optimizer.step()

    # --- the step --------------------------------------------------------------------------------
    def training_step(self, prompts: Prompts, batch_idx: int) -> None:
        start = time.perf_counter()
        beta = self.schedule.beta
        result = self.algo.step(self.pair, self.task, prompts, beta, self.optimize)
        metrics = result.metrics
        for key in ("reward/mean", "kl/mean", "loss/total"):
            if key in metrics and not math.isfinite(metrics[key]):
                raise RunFailed(f"{key} is {metrics[key]} at step {self.step_count}")
        if result.kl > self.kl_max:
            raise KLDiverged(f"KL {result.kl:.4g} ({self.kl_unit}) exceeded "
                             f"kl.max={self.kl_max} at step {self.step_count}")
        if self.task.should_evaluate(self.step_count, self.steps):
            metrics.update(self.task.evaluate(self.pair, self.step_count, result.beta_seq))
        self.schedule.update(result.kl, result.n_samples)
        if self.pair.due_for_sync(self.step_count):
            self.pair.sync_reference()
            self.algo.on_reference_sync(self.pair)
        step_s = time.perf_counter() - start
        metrics.update({"kl/beta": beta, "kl/target": self.kl_target, "perf/step_s": step_s,
                        "perf/tokens_per_s": metrics["perf/tokens"] / step_s})
        self.record(metrics)

    def record(self, metrics: dict[str, float]) -> None:
        """Send one step's metrics to every logger and the progress bar."""
        row = {"step": self.step_count, **metrics}
        self.history.append(row)
        for logger in self.loggers:
            logger.log_metrics(row, step=self.step_count)
        self.log_dict({"reward": metrics["reward/mean"], "kl": metrics["kl/mean"],
                       "beta": metrics["kl/beta"]}, prog_bar=True, logger=False,
                      on_step=True, on_epoch=False, batch_size=1)
        self.log("reward/mean", metrics["reward/mean"], logger=False, on_step=True,
                 on_epoch=False, batch_size=1)
        self.step_count += 1

    # --- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["klsweep"] = {"schedule": self.schedule.state_dict(),
                                 "algorithm": self.algo.state_dict(),
                                 "step_count": self.step_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["klsweep"]
        self.schedule.load_state_dict(state["schedule"])
        self.algo.load_state_dict(state["algorithm"])
        self.step_count = state["step_count"]
