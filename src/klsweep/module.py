"""The LightningModule: it holds the policy pair, the algorithm and the β schedule, feeds the
algorithm a batch of prompts each step, steers β with the KL the step measured, and records
the metrics. The algorithms' steps live in ``algos/``; they see the policy pair, never this
module.

Under data parallelism each rank samples its own prompts and completions; the step's metrics,
the KL that steers β and the sample count are reduced across ranks before anything reads
them, so that every rank applies the same β update and rank 0's record speaks for all."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from klsweep.algos.common import Algorithm, StepResult
from klsweep.checkpoint import ResumeError, any_rank, rng_state, set_rng_state
from klsweep.errors import KLDiverged, RunFailed
from klsweep.kl import Schedule
from klsweep.metrics import check_row
from klsweep.policy import PolicyPair
from klsweep.records import JsonlLogger, log_sample_table
from klsweep.rollout import Prompts
from klsweep.tasks.base import Task
from klsweep.trainer import FullyShardedStrategy

# metrics that count (summed over ranks) or peak (their maximum); the others are means
SUMMED = ("perf/tokens", "perf/samples", "dpo/pairs")
PEAKED = ("reward/max",)


class PromptStream(IterableDataset):
    """``steps`` batches of fresh prompts from the task, reproducible from ``seed``, from
    batch ``start`` on with the generator ``state`` a checkpoint saved: a resumed stream
    yields the same batches as the uninterrupted one, none skipped, none repeated."""

    def __init__(self, task: Task, n_prompts: int, steps: int, seed: int, *, start: int = 0,
                 state: Tensor | None = None) -> None:
        self.task, self.n_prompts, self.steps, self.start = task, n_prompts, steps, start
        self.generator = torch.Generator().manual_seed(seed)
        if state is not None:
            self.generator.set_state(state)
        self._before: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            # the loader fetches a batch or two ahead of the step that trains on it
            self._before[step] = self.generator.get_state()
            self._before.pop(step - 4, None)
            yield self.task.sample_prompts(self.n_prompts, self.generator)

    def state_before(self, step: int) -> Tensor:
        """The generator's state before batch ``step`` was drawn (a batch not yet drawn is
        the next one, drawn from the current state)."""
        return self._before.get(step, self.generator.get_state()).clone()


class KLPolicyModule(L.LightningModule):
    def __init__(self, pair: PolicyPair, task: Task, algorithm: Algorithm, schedule: Schedule,
                 *, steps: int, seed: int, optim: Any, kl_target: float, kl_max: float) -> None:
        super().__init__()
        self.pair = pair
        # registered as submodules, so that Lightning moves them to the run's device (a moving
        # reference also keeps the initial model, for kl/to_init)
        self.policy = pair.policy
        self.reference = pair.reference
        self.initial = pair.initial
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
        # steps up to this one reached the experiment loggers before a resume: recomputed
        # identically, they go to the local record only
        self.logged_until = -1
        self._restored: dict[str, Any] = {}  # a checkpoint's state that waits for fit
        self._sharded = False

    # --- sharding, data and optimiser ---------------------------------------------------------
    def configure_model(self) -> None:
        """Under ``trainer=fsdp``, shard the models before the optimiser sees them (once)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FullyShardedStrategy) and not self._sharded:
            strategy.shard(self.policy, (self.reference, self.initial), self.algo_module)
            self._sharded = True

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        state = self._restored.pop("stream", None)
        args = (self.task, self.algo.prompts_per_step(), self.steps,
                self.seed + 1000 * self.global_rank)
        self.stream = PromptStream(*args, start=self.step_count, state=state)
        # an engine that samples ahead (rollout.lag) reads the same prompts from its own copy
        self.pair.look_ahead(iter(PromptStream(*args, start=self.step_count, state=state)))
        return torch.utils.data.DataLoader(self.stream, batch_size=None)

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
        # decided on every rank at once: a rank that stopped alone would leave the others
        # waiting in the gradient all-reduce
        finite = bool(torch.isfinite(loss))
        if any_rank(self.trainer, not finite):
            raise RunFailed(f"loss is {loss.item()} at step {self.step_count}" if not finite
                            else f"another rank's loss is not finite at step {self.step_count}")
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip,
                                gradient_clip_algorithm="norm")
        optimizer.step()

    # --- the step --------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if "optimizer" in self._restored:  # the optimiser exists only once fit has begun
            self.trainer.strategy.load_optimizer_state_dict(
                {"optimizer_states": [self._restored.pop("optimizer")]})
        elif self.trainer.world_size > 1:
            # the ranks were seeded alike; their completions must not share random draws
            torch.manual_seed(self.seed + 1000 * self.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # set last: Lightning draws from the global RNG when it starts the data loader
        if "rng" in self._restored:
            set_rng_state(self._restored.pop("rng"))

    def training_step(self, prompts: Prompts, batch_idx: int) -> None:
        start = time.perf_counter()
        beta = self.schedule.beta
        result = self.algo.step(self.pair, self.task, prompts, beta, self.optimize)
        if self.trainer.world_size > 1:
            result = self._reduced(result, beta)
        metrics = result.metrics
        for key in ("reward/mean", "kl/mean", "loss/total"):
            if key in metrics and not math.isfinite(metrics[key]):
                raise RunFailed(f"{key} is {metrics[key]} at step {self.step_count}")
        if result.kl > self.kl_max:
            raise KLDiverged(f"KL {result.kl:.4g} ({self.kl_unit}) exceeded "
                             f"kl.max={self.kl_max} at step {self.step_count}")
        if self.task.should_evaluate(self.step_count, self.steps):
            eval_start = time.perf_counter()
            metrics.update(self.task.evaluate(self.pair, self.step_count, result.beta_seq))
            for name, rows in self.task.take_samples():
                self.record_samples(name, rows)
            metrics["perf/eval_s"] = time.perf_counter() - eval_start
        self.schedule.update(result.kl, result.n_samples)
        if self.pair.due_for_sync(self.step_count):
            self.pair.sync_reference()
            self.algo.on_reference_sync(self.pair)
        step_s = time.perf_counter() - start
        metrics.update({"kl/beta": beta, "kl/target": self.kl_target, "perf/step_s": step_s,
                        "perf/tokens_per_s": metrics["perf/tokens"] / step_s})
        self.record(metrics)

    def _reduced(self, result: StepResult, beta: float) -> StepResult:
        """The step's result over every rank: means, sums of counts, maxima of peaks; plus
        ``dist/*``, the spread across ranks of the β each applied (0 when they agree) and of
        the reward each measured on its own samples."""
        m = result.metrics
        keys = sorted(m)
        # the pooled batch's spread is not the mean of the ranks' spreads: it also holds how
        # far apart their means are, so the ranks share the reward's second moment
        second_moment = m["reward/std"] ** 2 + m["reward/mean"] ** 2 if "reward/std" in m else 0.0
        mean_or_sum = torch.tensor([m[k] for k in keys] + [second_moment, result.kl,
                                                           result.beta_seq,
                                                           float(result.n_samples)],
                                   dtype=torch.float64, device=self.device)
        peaks = torch.tensor([m[k] for k in PEAKED if k in m]
                             + [beta, -beta, m["reward/mean"], -m["reward/mean"]],
                             dtype=torch.float64, device=self.device)
        dist = torch.distributed
        dist.all_reduce(mean_or_sum, op=dist.ReduceOp.SUM)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        world = self.trainer.world_size
        total = mean_or_sum.tolist()
        metrics = {k: v if k in SUMMED else v / world
                   for k, v in zip(keys, total[:len(keys)], strict=True)}
        if "reward/std" in m:  # ranks draw equal batches, so the pooled moments are means
            pooled = total[len(keys)] / world - metrics["reward/mean"] ** 2
            metrics["reward/std"] = math.sqrt(max(pooled, 0.0))
        *peak, beta_max, neg_beta_min, reward_max, neg_reward_min = peaks.tolist()
        metrics.update(dict(zip([k for k in PEAKED if k in m], peak, strict=True)))
        metrics.update({"dist/world_size": float(world),
                        "dist/beta_spread": beta_max + neg_beta_min,
                        "dist/reward_spread": reward_max + neg_reward_min})
        kl, beta_seq, n_samples = total[-3:]
        return StepResult(metrics, kl / world, round(n_samples), beta_seq / world)

    def record_samples(self, name: str, rows: list[dict[str, Any]]) -> None:
        """An evaluation's samples to every logger that keeps them (samples/<name>.jsonl
        beside metrics.jsonl; a W&B table)."""
        for logger in self.loggers:
            if isinstance(logger, JsonlLogger):
                logger.log_samples(name, rows)
            elif self.step_count > self.logged_until:
                log_sample_table(logger, name, rows, self.step_count)

    def record(self, metrics: dict[str, float]) -> None:
        """Send one step's metrics to every logger (the progress bar reads the history); a
        name that ``klsweep.metrics`` does not declare stops the run."""
        row = {"step": self.step_count, **metrics}
        check_row(row)
        self.history.append(row)
        for logger in self.loggers:
            if isinstance(logger, JsonlLogger) or self.step_count > self.logged_until:
                logger.log_metrics(row, step=self.step_count)
        self.step_count += 1

    # --- checkpoints (klsweep.checkpoint writes them) -----------------------------------------
    def trained_state(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The entries of the state dict (``state``, else this module's) that training
        changes: the trainable parameters (with LoRA the adapter only), the buffers of the
        trained modules, and the reference's parameters only when it moves
        (``kl.reference.sync_every``)."""
        state = self.state_dict() if state is None else state
        moving = self.pair.kl.reference.sync_every > 0
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        trained |= {name for name, _ in self.named_buffers()
                    if not name.startswith(("reference.", "initial."))}
        return {key: value for key, value in state.items()
                if key in trained or (moving and key.startswith("reference."))}

    def trained_children(self) -> list[str]:
        """The submodules that hold what ``trained_state`` keeps: the policy, an algorithm's
        own module, and the reference when it moves."""
        names = ["policy"] + (["algo_module"] if self.algo_module is not None else [])
        return names + (["reference"] if self.pair.kl.reference.sync_every > 0 else [])

    def checkpoint_state(self) -> dict[str, Any]:
        """What the ranks share: the trained tensors, the optimiser, the schedule, the step
        count, the task's state and the pair's (rollouts sampled ahead). Every rank calls it:
        the strategy gathers the state, which under FSDP is collective (the full state lands
        on rank 0, which writes it)."""
        strategy = self.trainer.strategy
        return {"state_dict": self.trained_state(strategy.lightning_module_state_dict()),
                "optimizer_states": [strategy.optimizer_state(self.trainer.optimizers[0])],
                "global_step": self.step_count,
                "klsweep": {"step_count": self.step_count, "schedule": self.schedule.state_dict(),
                            "task": self.task.state_dict(), "pair": self.pair.state_dict()}}

    def rank_state(self) -> dict[str, Any]:
        """What each rank holds for itself: its random states, its prompt stream's position
        and its algorithm's state (DPO's data-set order, last measurement)."""
        return {"rng": rng_state(), "stream": self.stream.state_before(self.step_count),
                "algorithm": self.algo.state_dict()}

    def restore(self, checkpoint: dict[str, Any], rank: int) -> None:
        """Load a checkpoint before fit; the optimiser's and the RNG's state wait for the
        moment fit can take them (``on_train_start``, ``on_train_batch_start``)."""
        state = checkpoint["klsweep"]
        ranks = state["ranks"]
        if rank >= len(ranks):
            raise ResumeError(f"resume: the checkpoint holds {len(ranks)} ranks' states; this "
                              f"run has rank {rank} (resume with the same trainer.devices)")
        trained = checkpoint["state_dict"]
        expected = set(self.trained_state())
        _, unexpected = self.load_state_dict(trained, strict=False)
        if unexpected or expected - set(trained):
            extra = sorted(set(unexpected) | (expected - set(trained)))
            raise ResumeError(f"resume: the checkpoint does not fit this model "
                              f"({', '.join(extra[:3])})")
        self.schedule.load_state_dict(state["schedule"])
        self.task.load_state_dict(state["task"])
        self.pair.load_state_dict(state.get("pair", {}))
        self.step_count = state["step_count"]
        mine = ranks[rank]
        self.algo.load_state_dict(mine["algorithm"])
        self._restored = {"optimizer": checkpoint["optimizer_states"][0], "rng": mine["rng"],
                          "stream": mine["stream"]}
