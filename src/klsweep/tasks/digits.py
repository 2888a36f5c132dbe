"""The default task: a small synthetic language of digits, and a reward that pulls away from it.

Language: ``BOS d d d d`` prompts, then a completion of ``min_len``..``max_len`` digits and
EOS. Each digit follows the previous one by +1 (mod 10) with probability ``p_step``, else it
is uniform; after ``min_len`` digits the sequence ends with probability ``p_stop``.

Reward: the mean digit of the completion divided by 9, in [0, 1]. The reference language
scores about 0.5; the string of all nines scores 1 and is nearly impossible under the
reference (per-token KL ≈ 3 nats). Without a KL penalty the policy collapses onto it (reward
hacking); with one it keeps the language and leans toward larger digits.

With ``reward_source=proxy`` the policy optimises a reward model trained on gold-labelled
pairs of the language's samples instead (klsweep.tasks.proxy), and every step logs
``reward/proxy`` and ``reward/gold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor

from klsweep.models.reference import ReferenceRecipe
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError, from_node, spec
from klsweep.tasks.base import SyntheticTaskConfig, Task
from klsweep.tasks.proxy import ProxyConfig, ProxyReward, check_proxy


def digit_reward(completions: Tensor, mask: Tensor) -> Tensor:
    """The mean digit of each completion [B, N] over ``mask``, divided by 9 (EOS is no digit)."""
    is_digit = mask & (completions < 10)
    digit_sum = torch.where(is_digit, completions, 0).sum(1).float()
    return digit_sum / (9.0 * is_digit.sum(1).clamp(min=1).float())


@dataclass
class DigitsConfig(SyntheticTaskConfig):
    """``task=digits`` (defaults: conf/task/digits.yaml)."""

    name: str = spec(kind="choice", choices=("digits",), help="the task")
    prompt_digits: int = spec(kind="integer", ge=1, help="digits in each prompt after BOS")
    min_len: int = spec(kind="integer", ge=1, help="shortest completion, in digits")
    max_len: int = spec(kind="integer", ge=1, help="longest completion, in digits")
    p_step: float = spec(kind="number", ge=0, le=1, help="P(next digit = previous + 1)")
    p_stop: float = spec(kind="number", gt=0, le=1, help="P(stop) after each digit past min_len")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        if cfg.task.min_len > cfg.task.max_len:
            raise ConfigError(f"task.min_len must be <= task.max_len "
                              f"(got {cfg.task.min_len} > {cfg.task.max_len})")
        check_proxy(cfg)


# settings that do not shape the language (nor the reference), left out of its cache key
_NOT_LANGUAGE = ("name", "reward_source", "proxy")


def _language(c: DigitsConfig) -> dict:
    """The settings that shape the reference (its cache key)."""
    return {k: v for k, v in asdict(c).items() if k not in _NOT_LANGUAGE} | {"cache_dir": None}


class DigitsTask(Task):
    name = "digits"
    Config = DigitsConfig
    BOS, EOS = 10, 11

    def __init__(self, config: DigitsConfig) -> None:
        self.config = config
        self.vocab_size = 12
        self.eos_id = self.EOS
        self.prompt_len = 1 + config.prompt_digits
        self.max_new_tokens = config.max_len + 1
        self.proxy = None if config.reward_source == "gold" else ProxyReward(
            from_node(ProxyConfig, config.proxy), key={"task": self.name,
                                                       "language": _language(config)},
            cache_dir=config.cache_dir, vocab_size=self.vocab_size,
            prompt_len=self.prompt_len, block_size=self.prompt_len + self.max_new_tokens,
            sample_pairs=self.sample_pairs, gold=digit_reward)

    def _next_digits(self, prev: Tensor, generator: torch.Generator) -> Tensor:
        step = torch.rand(prev.shape, generator=generator) < self.config.p_step
        uniform = torch.randint(0, 10, prev.shape, generator=generator)
        return torch.where(step, (prev + 1) % 10, uniform)

    def _sample_digits(self, n: int, length: int, generator: torch.Generator,
                       first: Tensor | None = None) -> Tensor:
        digits = torch.empty(n, length, dtype=torch.long)
        prev = torch.randint(0, 10, (n,), generator=generator) if first is None else first
        for t in range(length):
            prev = self._next_digits(prev, generator) if (t > 0 or first is not None) else prev
            digits[:, t] = prev
        return digits

    def _prompt_tokens(self, n: int, generator: torch.Generator) -> Tensor:
        digits = self._sample_digits(n, self.config.prompt_digits, generator)
        return torch.cat([torch.full((n, 1), self.BOS, dtype=torch.long), digits], dim=1)

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        return Prompts.unpadded(self._prompt_tokens(n, generator))

    def sample_sequences(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Prompts and completions from the language itself: tokens [n, P+N] and the mask of
        next-token targets to learn (the completion up to and including EOS)."""
        tokens, mask = self._complete(self._prompt_tokens(n, generator), generator)
        targets = torch.cat([torch.ones(n, self.prompt_len - 1, dtype=torch.bool), mask], dim=1)
        return tokens, targets.float()

    def sample_pairs(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pairs of completions of the language, rows 2i and 2i+1 of one prompt: tokens
        [2n, P+N] and the completion mask [2n, N] (up to and including EOS)."""
        return self._complete(self._prompt_tokens(n, generator).repeat_interleave(2, dim=0),
                              generator)

    def _complete(self, prompts: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Completions of ``prompts`` [n, P] from the language: tokens [n, P+N] and the
        completion mask [n, N] (up to and including EOS)."""
        c, n = self.config, len(prompts)
        body = self._sample_digits(n, c.max_len, generator, first=prompts[:, -1])
        extra = torch.rand(n, c.max_len - c.min_len, generator=generator) >= c.p_stop
        # length = min_len + number of "continue" draws before the first "stop"
        length = c.min_len + extra.long().cumprod(dim=1).sum(dim=1)
        positions = torch.arange(self.max_new_tokens)
        completion = torch.full((n, self.max_new_tokens), self.EOS, dtype=torch.long)
        completion[:, : c.max_len] = body
        completion = torch.where(positions < length[:, None], completion, self.EOS)
        return torch.cat([prompts, completion], dim=1), positions[None] <= length[:, None]

    def reward(self, rollout: Rollout) -> Tensor:
        if self.proxy is None:
            return digit_reward(rollout.completions, rollout.mask)
        return self.proxy(rollout)

    def reward_metrics(self, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        """With the proxy: ``reward/proxy`` (``rewards``, what the policy optimised) and
        ``reward/gold``; nothing more with the gold reward, which is ``reward/mean``."""
        return {} if self.proxy is None else self.proxy.metrics(rollout, rewards)

    def reference_recipe(self) -> ReferenceRecipe:
        key = {"task": self.name, "language": _language(self.config)}
        return self.config.reference_recipe(key, self.sample_sequences)
