"""What every task gives the trainer: prompts, a reward, and how its reference is made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klsweep.models.reference import ReferenceRecipe
from klsweep.policy import PolicyPair
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import spec
from klsweep.tasks.proxy import ProxyConfig

# what a synthetic task's policy optimises: its own (gold) reward, or a proxy reward model
# of it (tasks/proxy.py)
REWARD_SOURCES = ("gold", "proxy")


@dataclass
class SyntheticTaskConfig:
    """The fields of every synthetic task (digits, exact): its reference is trained on its
    own language, and the policy may optimise a proxy of its reward."""

    steps: int = spec(kind="integer", ge=1,
                      help="policy updates a run of this task takes by default (the run's steps)")
    reference_steps: int = spec(kind="integer", ge=1, help="reference training steps")
    reference_batch_size: int = spec(kind="integer", ge=1, help="reference training batch")
    reference_lr: float = spec(kind="number", gt=0, help="reference training learning rate")
    reference_seed: int = spec(kind="integer", ge=0, help="reference training seed")
    cache_dir: str = spec(kind="string", help="where trained references are cached")
    reward_source: str = spec(kind="choice", choices=REWARD_SOURCES,
                              help="what the policy optimises: the reward, or a model of it")
    proxy: ProxyConfig = spec(kind="node", help="the proxy reward model (reward_source=proxy)")

    def reference_recipe(self, key: dict[str, Any],
                         sample_sequences: Callable[[int, torch.Generator], Any]
                         ) -> ReferenceRecipe:
        """Maximum likelihood on ``sample_sequences`` batches, as these fields say."""
        return ReferenceRecipe(
            key=key, sample_batch=lambda g: sample_sequences(self.reference_batch_size, g),
            steps=self.reference_steps, lr=self.reference_lr, seed=self.reference_seed,
            cache_dir=self.cache_dir)


class Task:
    """A prompt distribution, a reward on completions and the reference policy's recipe."""

    name = "base"
    needs_tokenizer = False  # True: built with the model's tokenizer (text tasks)
    needs_evaluation = False  # True: built with the eval node (held-out evaluation, pass@k)
    vocab_size: int
    eos_id: int
    prompt_len: int
    max_new_tokens: int

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        """``n`` prompts, drawn with ``generator``."""
        raise NotImplementedError

    def reward(self, rollout: Rollout) -> Tensor:
        """Task reward [B] of each completion of ``rollout``."""
        raise NotImplementedError

    def reward_metrics(self, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        """Reward metrics of a batch beyond ``reward/*`` (with a proxy reward model:
        ``reward/proxy`` and ``reward/gold``)."""
        return {}

    def reference_recipe(self) -> ReferenceRecipe | None:
        """How the reference is trained for this task (the synthetic tasks: maximum
        likelihood on their language); None: the reference is the pretrained model."""
        return None

    def preference_pairs(self) -> Rollout | None:
        """A preference data set of the task's own (rows 2i, 2i+1 = chosen, rejected), which
        offline DPO trains on instead of labelling π_ref's samples; None: there is none."""
        return None

    def should_evaluate(self, step: int, total_steps: int) -> bool:
        """Whether ``evaluate`` runs after update ``step`` (0-based) of ``total_steps``."""
        return False

    def evaluate(self, pair: PolicyPair, step: int, beta_seq: float) -> dict[str, float]:
        """Extra metrics of the current policy after update ``step`` (the exact task's
        ``exact/*``); ``beta_seq`` is the coefficient on sequence-level KL that the algorithm
        applies."""
        return {}

    def take_samples(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """The samples the evaluations since the last call wrote, as (name, rows): the
        training loop sends them to ``RUN_DIR/samples/<name>.jsonl`` and to W&B."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the task's own state (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finalize(self, pair: PolicyPair, run_dir: Path) -> None:
        """Write the task's own record of the run into ``run_dir`` after fit (the exact
        task's ``exact.json``); called on rank 0, whether the run completed or failed."""
