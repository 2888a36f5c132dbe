"""DPO (Rafailov et al. 2023) and its IPO and hinge variants on preference pairs labelled from
the task reward, with DPO's β taken from the KL schedule.

Pairs are two completions of one prompt. Offline (default), they are sampled once from π_ref,
labelled once by Bradley–Terry sampling, P(a ≻ b) = σ(r_a − r_b), and their reference
log-probs computed once: a fixed preference data set, like the ones DPO is trained on.
Bradley–Terry labels make the minimiser of the sigmoid loss the KL-regularised optimum
π* ∝ π_ref·exp(r/β). Online (``algo.online``), fresh pairs come from the current policy.

DPO has no KL term: β *is* the coefficient of the sequence-level KL in the objective it
solves. With ``kl.divergence`` another f-divergence takes the KL's place, still over whole
sequences (f-DPO, Wang et al. 2023; the losses are in klsweep.algos.dpo_losses).
KL(π‖π_ref) is measured on fresh policy samples: every step online (the pairs are such
samples), every ``algo.eval_every`` steps offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from klsweep.algos.common import Algorithm, Optimize, StepResult, sample_and_score
from klsweep.algos.dpo_losses import LOSSES, check_f_dpo_loss, dpo_loss, sequence_logratio
from klsweep.errors import RunFailed
from klsweep.kl import ESTIMATORS, masked_sum
from klsweep.policy import Measurement, PolicyPair
from klsweep.preferences import LABELS, preference_labels
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError, describe, spec
from klsweep.tasks.base import Task

# offline pairs are sampled from π_ref in chunks of this many prompts (bounds the KV cache)
_DATASET_CHUNK = 1024
# rows of a chunk decoded at once, with the tokens of one batch (rollout.generate): their KV
# cache was the run's memory peak at 2048 rows (100 MB at the benchmark's shape)
_DECODE_ROWS = 512
# what becomes of a pair whose two completions have the same reward (both right, or both wrong,
# under a verifier): keep it, labelled by a coin, or drop it (pairs of a correct and an
# incorrect answer only, as Pang et al. 2024 build them for reasoning)
TIES = ("keep", "drop")




def order_pairs(a_preferred: Tensor) -> Tensor:
    """Row order [2B] that puts each pair (rows 2i, 2i+1) as chosen then rejected, given
    whether each pair's first row is preferred [B]."""
    first = 2 * torch.arange(a_preferred.shape[0], device=a_preferred.device)
    chosen = torch.where(a_preferred, first, first + 1)
    return torch.stack([chosen, 2 * first - chosen + 1], dim=1).reshape(-1)


@dataclass
class PreferencePairs:
    """Pairs as rows (2i, 2i+1) = (chosen, rejected) of ``rollout``, with each row's task
    reward and sequence log-prob under π_ref."""

    rollout: Rollout
    rewards: Tensor
    ref_logp: Tensor

    def __len__(self) -> int:
        return self.rollout.tokens.shape[0] // 2

    def pairs(self, index: Tensor) -> PreferencePairs:
        """The pairs ``index``; each pair's two rows stay together, and since a pair shares
        its prompt, the model passes compute each prompt once per pair."""
        rows = torch.stack([2 * index, 2 * index + 1], dim=1).reshape(-1)
        return PreferencePairs(self.rollout.rows(rows, group_size=2), self.rewards[rows],
                               self.ref_logp[rows])


@dataclass
class DPOConfig:
    """``algo=dpo`` (defaults and their sources: conf/algo/dpo.yaml)."""

    name: str = spec(kind="choice", choices=("dpo",), help="the algorithm")
    kl_placement: str = spec(kind="choice", choices=("none",),
                             help="none: DPO's β is its own loss's KL coefficient")
    kl_estimator: str = spec(kind="choice", choices=ESTIMATORS, help="estimator of the logged KL")
    kl_is_correction: bool = spec(kind="bool", help="DPO's (unused: no KL term) kl.is_correction")
    loss: str = spec(kind="choice", choices=LOSSES, help="the preference loss (TRL loss_type)")
    label_smoothing: float = spec(kind="number", ge=0, lt=0.5,
                                  help="ε: robust's known flip rate; sigmoid: cDPO (not TRL 1.16)")
    ipo_normalize: bool = spec(kind="bool", help="ipo on the per-token mean log-ratio (TRL)")
    labels: str = spec(kind="choice", choices=LABELS, help="how pairs are labelled from rewards")
    ties: str = spec(kind="choice", choices=TIES,
                     help="keep: pairs of equal reward too | drop: only pairs a reward orders")
    online: bool = spec(kind="bool", help="fresh pairs from π each step instead of a data set")
    pairs_per_step: int = spec(kind="integer", ge=1, help="pairs per update")
    dataset_pairs: int = spec(kind="integer", ge=1, help="size of the offline data set")
    eval_every: int = spec(kind="integer", ge=1, help="offline: steps between KL measurements")
    eval_prompts: int = spec(kind="integer", ge=1, help="prompts per KL measurement")
    eval_samples_per_prompt: int = spec(kind="integer", ge=1,
                                        help="samples per prompt per KL measurement")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        if cfg.kl.placement != "none":
            raise ConfigError(f"kl.placement must be none for algo=dpo: DPO's β is the KL "
                              f"coefficient of its own loss (got {describe(cfg.kl.placement)})")
        if not cfg.kl.beta > 0:
            raise ConfigError(f"kl.beta must be > 0 for algo=dpo: it is DPO's β "
                              f"(got {cfg.kl.beta})")
        try:
            check_f_dpo_loss(cfg.algo.loss, cfg.kl.divergence)
        except ValueError as error:
            raise ConfigError(f"algo.loss={cfg.algo.loss}: {error}") from None
        if cfg.kl.divergence != "reverse_kl" and cfg.kl.unit != "sequence":
            # only the KL's chain rule makes a token-unit objective DPO's sequence one
            raise ConfigError(f"kl.unit must be sequence for algo=dpo with kl.divergence="
                              f"{cfg.kl.divergence}: f-DPO regularises whole sequences "
                              f"(got {describe(cfg.kl.unit)})")


class DPO(Algorithm):
    """The DPO step on the policy pair."""

    Config = DPOConfig

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.dataset: PreferencePairs | None = None
        self.order = torch.empty(0, dtype=torch.long)
        self.last_measurement: Measurement | None = None
        self.steps_done = 0
        # the random state the offline data set was drawn from (see _dataset)
        self.dataset_rng: dict[str, Tensor] | None = None

    def setup(self, pair: PolicyPair, seed: int) -> nn.Module | None:
        self.seed = seed  # the offline data set's prompts and samples come from it
        self.divergence = pair.divergence
        return None

    def prompts_per_step(self) -> int:
        c = self.config
        return c.pairs_per_step if c.online else c.eval_prompts

    # --- pairs --------------------------------------------------------------------------------
    def _label_order(self, rewards: Tensor) -> Tensor:
        """Row order putting each sampled pair (rows 2i, 2i+1) as chosen, rejected."""
        return order_pairs(preference_labels(rewards[0::2], rewards[1::2], self.config.labels))

    def _kept_rows(self, order: Tensor, rewards: Tensor) -> Tensor:
        """The rows of ``order`` (pairs as chosen, rejected) that training keeps: every one,
        or with ``ties=drop`` those of pairs whose rewards differ."""
        if self.config.ties == "keep":
            return order
        ordered = rewards[order]
        differ = (ordered[0::2] != ordered[1::2]).repeat_interleave(2)
        return order[differ]

    @torch.no_grad()
    def _reference_dataset(self, pair: PolicyPair, task: Task) -> PreferencePairs:
        """The task's own preference pairs when it has them (a preference file), else
        ``dataset_pairs`` pairs of π_ref samples on fresh prompts, labelled once; their
        reference log-probs computed once."""
        given = task.preference_pairs()
        if given is not None:
            # a file's pairs come labelled, without task rewards
            rollout = given.to(pair.device)
            rewards = torch.full((rollout.tokens.shape[0],), float("nan"), device=pair.device)
            return PreferencePairs(rollout, rewards, self._reference_logps(pair, rollout))
        c = self.config
        generator = torch.Generator().manual_seed(self.seed)
        rollouts, rewards = [], []
        for start in range(0, c.dataset_pairs, _DATASET_CHUNK):
            n = min(_DATASET_CHUNK, c.dataset_pairs - start)
            sampled = pair.sample_reference(task.sample_prompts(n, generator).to(pair.device), 2,
                                            max_rows=_DECODE_ROWS)
            scores = task.reward(sampled)
            order = self._label_order(scores)
            rows = self._kept_rows(order, scores)
            rollouts.append(sampled.rows(rows, group_size=2))
            rewards.append(scores[rows])
        if sum(len(r) for r in rewards) == 0:
            raise RunFailed(f"algo.ties=drop left no pair: all {c.dataset_pairs} pairs of "
                            f"reference samples have equal rewards")
        rollout = Rollout.cat([r for r in rollouts if r.tokens.shape[0]])
        return PreferencePairs(rollout, torch.cat(rewards), self._reference_logps(pair, rollout))

    @staticmethod
    def _reference_logps(pair: PolicyPair, rollout: Rollout) -> Tensor:
        """Sequence log-probs under π_ref of every row, ``_DATASET_CHUNK`` pairs at a time."""
        chunks = []
        for start in range(0, rollout.tokens.shape[0], 2 * _DATASET_CHUNK):
            rows = torch.arange(start, min(start + 2 * _DATASET_CHUNK, rollout.tokens.shape[0]),
                                device=rollout.tokens.device)
            part = rollout.rows(rows, group_size=2)
            _, ref_logp = pair.reference_logprobs(part)
            chunks.append(masked_sum(ref_logp, part.mask))
        return torch.cat(chunks)

    @torch.no_grad()
    def on_reference_sync(self, pair: PolicyPair) -> None:
        """The data set's stored reference log-probs are the old reference's: recompute
        them (TR-DPO)."""
        if self.dataset is not None:
            self.dataset.ref_logp = self._reference_logps(pair, self.dataset.rollout)

    def _dataset(self, pair: PolicyPair, task: Task) -> PreferencePairs:
        """The offline data set, drawn at the first step from the global random state as it
        stands then. A resumed run draws the same pairs again from that saved state, and its
        own random state stays where its checkpoint put it."""
        cuda = [pair.device] if pair.device.type == "cuda" else []
        if self.dataset_rng is None:
            self.dataset_rng = {"cpu": torch.get_rng_state(),
                                **({"cuda": torch.cuda.get_rng_state(pair.device)} if cuda else {})}
            return self._reference_dataset(pair, task)
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self.dataset_rng["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self.dataset_rng["cuda"], pair.device)
            return self._reference_dataset(pair, task)

    def _next_offline_batch(self, pair: PolicyPair, task: Task) -> PreferencePairs:
        """The next ``pairs_per_step`` pairs of the data set, in a fresh order each epoch."""
        if self.dataset is None:
            self.dataset = self._dataset(pair, task)
        n = self.config.pairs_per_step
        while self.order.numel() < n:
            self.order = torch.cat([self.order, torch.randperm(len(self.dataset))])
        index, self.order = self.order[:n], self.order[n:]
        return self.dataset.pairs(index.to(pair.device))

    # --- the step -----------------------------------------------------------------------------
    def step(self, pair: PolicyPair, task: Task, prompts: Prompts, beta: float,
             optimize: Optimize) -> StepResult:
        if self.config.online:
            # the pairs are fresh policy samples: KL and reward are measured on them, pre-update
            fresh = sample_and_score(pair, task, prompts, 2)
            order = self._kept_rows(self._label_order(fresh.rewards), fresh.rewards)
            scored = fresh.scored.rows(order, group_size=2)
            measurement = fresh.measurement
            metrics = dict(measurement.metrics)
            batch = PreferencePairs(scored.rollout, fresh.rewards[order],
                                    masked_sum(scored.ref_logp, scored.mask))
            logp = scored.logp
            if len(batch) == 0:  # ties=drop and every pair tied: nothing to learn this step
                self.steps_done += 1
                return StepResult({**metrics, "dpo/pairs": 0.0}, measurement.kl,
                                  measurement.n_samples, beta)
        else:
            measurement, fresh_eval = self._offline_measurement(pair, task, prompts)
            metrics = {**measurement.metrics, "dpo/fresh_eval": float(fresh_eval)}
            batch = self._next_offline_batch(pair, task)
            _, logp = pair.policy_logprobs(batch.rollout)
            # tokens this step handled: those sampled to measure, plus the pairs trained on
            metrics["perf/tokens"] += float(batch.rollout.mask.sum())
        metrics.update(self._update(batch, logp, beta, optimize))
        self.steps_done += 1
        # DPO solves max E[r] − β·KL(π‖π_ref) over sequences: β is the sequence coefficient
        return StepResult(metrics, measurement.kl, measurement.n_samples, beta)

    def _offline_measurement(self, pair: PolicyPair, task: Task,
                             prompts: Prompts) -> tuple[Measurement, bool]:
        """KL and reward of fresh policy samples every ``eval_every`` steps; between them the
        last measurement is carried with no samples, so the schedule leaves β where it is."""
        if self.steps_done % self.config.eval_every == 0 or self.last_measurement is None:
            fresh = sample_and_score(pair, task, prompts, self.config.eval_samples_per_prompt,
                                     grad=False)
            self.last_measurement = fresh.measurement
            return fresh.measurement, True
        return self.last_measurement.carried(), False

    def _update(self, batch: PreferencePairs, logp: Tensor, beta: float,
                optimize: Optimize) -> dict[str, float]:
        """One optimiser step on the DPO loss of ``batch``, given the policy's log-probs."""
        c = self.config
        per_token = c.loss == "ipo" and c.ipo_normalize
        logratio = sequence_logratio(logp, batch.ref_logp, batch.rollout.mask,
                                     per_token=per_token).view(-1, 2)
        losses, chosen, rejected = dpo_loss(logratio[:, 0], logratio[:, 1], beta, c.loss,
                                            c.label_smoothing, self.divergence)
        loss = losses.mean()
        optimize(loss)
        scores = batch.rewards.view(-1, 2)
        metrics = {
            "loss/dpo": float(loss.detach()),
            "loss/total": float(loss.detach()),
            "dpo/margin": float((chosen - rejected).mean()),
            "dpo/accuracy": float((chosen > rejected).float().mean()),
            "dpo/chosen_reward": float(chosen.mean()),
            "dpo/rejected_reward": float(rejected.mean()),
            "dpo/pairs": float(scores.shape[0]),
        }
        if not bool(scores.isnan().any()):  # a preference file's pairs carry no task reward
            metrics["dpo/score_gap"] = float((scores[:, 0] - scores[:, 1]).mean())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        last = self.last_measurement
        return {"order": self.order, "steps_done": self.steps_done,
                "dataset_rng": self.dataset_rng,
                "last_measurement": None if last is None else
                {"metrics": last.metrics, "kl": last.kl, "n_samples": last.n_samples}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.steps_done = state["order"], state["steps_done"]
        self.dataset_rng = state.get("dataset_rng")
        last = state.get("last_measurement")
        self.last_measurement = None if last is None else Measurement(**last)
