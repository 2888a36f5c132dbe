"""The LightningModule: it owns the policy, the frozen reference and the β schedule, and
offers the algorithms the services they share (sampling, log-probs, the KL term, one
optimiser step, the metrics every step logs). Each algorithm's step lives in ``algos/``."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import IterableDataset

from klsweep.config import build_schedule
from klsweep.kl import kl_metrics, kl_penalty_per_token, kl_per_token, masked_mean
from klsweep.models.tiny import TinyGPT
from klsweep.rollout import Rollout, completion_logits, generate, token_entropy, token_logprobs
from klsweep.tasks.base import Task


class RunFailed(RuntimeError):
    """The run cannot go on: a NaN, or a KL past ``kl.max``. ``status`` goes to the summary."""

    status = "failed"


class KLDiverged(RunFailed):
    status = "diverged"


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
    def __init__(self, cfg: DictConfig, task: Task, policy: TinyGPT, reference: TinyGPT,
                 algorithm: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.policy = policy
        self.reference = reference.requires_grad_(False)
        self.algo = algorithm
        # an algorithm's own trainable parts (PPO's value head) train beside the policy;
        # ``attach`` sizes them from the policy first
        if hasattr(algorithm, "attach"):
            algorithm.attach(policy)
        self.algo_module = getattr(algorithm, "module", None)
        self.schedule = build_schedule(cfg.kl)
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []
        self.step_count = 0

    # --- data and optimiser -----------------------------------------------------------------
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        stream = PromptStream(self.task, self.algo.prompts_per_step(), self.cfg.steps,
                              self.cfg.seed + 1000 * self.global_rank)
        return torch.utils.data.DataLoader(stream, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = list(self.policy.parameters())
        if self.algo_module is not None:
            params += list(self.algo_module.parameters())
        # foreach: one fused kernel per op over all tensors; torch picks it only on CUDA, and
        # the per-tensor loop costs ~8x more per step on CPU for this model
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay, foreach=True)

    # --- services for the algorithms ----------------------------------------------------------
    def sample(self, prompts: Tensor, n_per_prompt: int) -> Rollout:
        self.policy.eval()
        rollout = generate(self.policy, prompts, n_per_prompt=n_per_prompt,
                           max_new_tokens=self.task.max_new_tokens, eos_id=self.task.eos_id,
                           temperature=self.cfg.rollout.temperature)
        self.policy.train()
        return rollout

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        self.reference.eval()
        logits = completion_logits(self.reference, rollout.tokens, rollout.prompt_len,
                                   self.cfg.rollout.temperature, rollout.group_size)
        return logits, token_logprobs(logits, rollout.completions)

    def policy_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        logits = completion_logits(self.policy, rollout.tokens, rollout.prompt_len,
                                   self.cfg.rollout.temperature, rollout.group_size)
        return logits, token_logprobs(logits, rollout.completions)

    @torch.no_grad()
    def kl_values(self, logp: Tensor, ref_logp: Tensor, logits: Tensor,
                  ref_logits: Tensor) -> Tensor:
        """The configured estimator per token, without gradient (for the reward)."""
        kl = self.cfg.kl
        return kl_per_token(logp, ref_logp, kl.estimator, logits=logits, ref_logits=ref_logits,
                            clamp=kl.clamp)

    def kl_loss_term(self, logp: Tensor, ref_logp: Tensor, logits: Tensor, ref_logits: Tensor,
                     old_logp: Tensor) -> Tensor:
        """The per-token KL term of a loss, with its gradient through log π_θ."""
        kl = self.cfg.kl
        term = kl_penalty_per_token(logp, ref_logp, kl.estimator, gradient=kl.gradient,
                                    logits=logits, ref_logits=ref_logits, clamp=kl.clamp)
        if kl.is_correction:
            term = term * torch.exp(logp - old_logp).detach()
        return term

    def optimize(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise RunFailed(f"loss is {loss.item()} at step {self.step_count}")
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.cfg.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.optim.grad_clip,
                                gradient_clip_algorithm="norm")
        optimizer.step()

    @torch.no_grad()
    def rollout_metrics(self, rollout: Rollout, rewards: Tensor, logits: Tensor, logp: Tensor,
                        ref_logits: Tensor, ref_logp: Tensor) -> dict[str, float]:
        """Reward, KL (every estimator, from this batch) and policy statistics."""
        mask = rollout.mask
        metrics = kl_metrics(logp, ref_logp, mask, self.cfg.kl.estimator, logits=logits,
                             ref_logits=ref_logits, clamp=self.cfg.kl.clamp)
        distinct = len({tuple(row) for row in rollout.completions.tolist()})
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/max": float(rewards.max()),
            "policy/entropy": float(masked_mean(token_entropy(logits), mask)),
            "policy/length": float(mask.sum(1).float().mean()),
            "policy/distinct": distinct / rewards.numel(),
            "perf/samples": float(rewards.numel()),
            "perf/tokens": float(mask.sum()),
        })
        return metrics

    # --- the step --------------------------------------------------------------------------------
    def training_step(self, prompts: Tensor, batch_idx: int) -> None:
        start = time.perf_counter()
        beta = self.schedule.beta
        metrics = self.algo.step(self, prompts)
        kl_for_schedule = metrics["kl/mean" if self.cfg.kl.unit == "token" else "kl/seq"]
        for key in ("reward/mean", "kl/mean", "loss/total"):
            if key in metrics and not math.isfinite(metrics[key]):
                raise RunFailed(f"{key} is {metrics[key]} at step {self.step_count}")
        if kl_for_schedule > self.cfg.kl.max:
            raise KLDiverged(f"KL {kl_for_schedule:.4g} ({self.cfg.kl.unit}) exceeded "
                             f"kl.max={self.cfg.kl.max} at step {self.step_count}")
        if self.task.should_evaluate(self.step_count, self.cfg.steps):
            beta_seq = self.algo.beta_seq(self, beta, metrics)
            metrics.update(self.task.evaluate(self, beta_seq=beta_seq))
        self.schedule.update(kl_for_schedule, int(metrics["perf/samples"]))
        step_s = time.perf_counter() - start
        metrics.update({"kl/beta": beta, "kl/target": self.cfg.kl.target, "perf/step_s": step_s,
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
                                 "step_count": self.step_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["klsweep"]
        self.schedule.load_state_dict(state["schedule"])
        self.step_count = state["step_count"]
