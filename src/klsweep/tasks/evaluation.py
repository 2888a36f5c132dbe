"""Held-out evaluation of a policy on a verifiable task: ``eval.samples`` completions of each
of ``eval.prompts`` questions at ``eval.temperature``, and the metrics Yue et al. (2025) read
RL-trained models by (the ``eval`` node; config: ``EvalConfig``):

* ``eval/accuracy``: the mean score (reasoning-gym's ``score_answer``, 0 to 1);
* ``eval/pass@k`` for each k in ``eval.k``: the unbiased estimate of the expected best score
  of k samples (klsweep.pass_at_k; Chen et al. 2021's estimator for 0/1 scores);
* ``eval/entropy``: the policy's mean next-token entropy over the completion tokens it
  sampled, in nats per token, at the evaluation's temperature (computed over the whole
  vocabulary, as ``policy/entropy`` is during training);
* ``eval/format_rate``: the share of completions that wrote the answer tag.

Evaluation samples from its own seed (``eval.seed`` and the step) inside a forked random
state: how often a run evaluates never changes what it trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from klsweep.pass_at_k import pass_at_k
from klsweep.rollout import Prompts, Rollout, completion_logits, generate, token_entropy
from klsweep.schema import ConfigError, spec

# rows sampled (and scored for entropy) at once: bounds a real model's KV cache and logits
_EVAL_ROWS = 256


@dataclass
class EvalConfig:
    """The ``eval`` node: held-out evaluation (task=reasoning; the exact task's pass@k)."""

    every: int = spec(kind="integer", ge=1, help="steps between evaluations (and the last)")
    prompts: int = spec(kind="integer", ge=1, help="held-out questions")
    samples: int = spec(kind="integer", ge=1, help="completions of each (n of pass@k)")
    k: list = spec(kind="list", help="pass@k for each k (each <= eval.samples)")
    temperature: float | None = spec(kind="number", gt=0, optional=True,
                                     help="sampling temperature; null: rollout.temperature")
    seed: int = spec(kind="integer", ge=0, help="seed of the evaluation's samples")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        ev = cfg.eval
        if not ev.k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                           for k in ev.k):
            raise ConfigError(f"eval.k must be a list of integers >= 1 (got {list(ev.k)})")
        if max(ev.k) > ev.samples:
            raise ConfigError(f"eval.k must be <= eval.samples={ev.samples}: pass@k needs at "
                              f"least k samples of a question (got k={max(ev.k)})")


@dataclass
class EvalSamples:
    """A model's evaluation samples: the rollout (``prompt_index``: the question of each row)
    and the mean next-token entropy of each row's completion [B]."""

    rollout: Rollout
    entropy: Tensor


@torch.no_grad()
def sample_for_evaluation(model: nn.Module, prompts: Prompts, *, samples: int,
                          temperature: float, max_new_tokens: int, eos_id: int,
                          seed: int) -> EvalSamples:
    """``samples`` completions of every prompt from ``model``, a few hundred rows at a time,
    drawn from ``seed`` without moving the run's random state; with each row's entropy."""
    device = prompts.tokens.device
    was_training = model.training
    model.eval()
    per_chunk = max(1, _EVAL_ROWS // samples)
    parts, entropies = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), per_chunk):
            rollout = generate(model, prompts[start:start + per_chunk], n_per_prompt=samples,
                               max_new_tokens=max_new_tokens, eos_id=eos_id,
                               temperature=temperature)
            entropy = token_entropy(completion_logits(model, rollout, temperature))
            mask = rollout.mask.float()
            entropies.append((entropy * mask).sum(1) / mask.sum(1).clamp(min=1))
            parts.append(rollout)
    model.train(was_training)
    return EvalSamples(Rollout.cat(parts), torch.cat(entropies))


def evaluation_metrics(scores: np.ndarray, tagged: np.ndarray, entropy: Tensor, mask: Tensor,
                       ks: list[int], prefix: str = "eval/") -> dict[str, float]:
    """The metrics of one evaluation from scores and tag use [P, n] (rows of one question
    together), the rows' mean entropies [P·n] and their completion masks [P·n, N]: entropy is
    the mean over every sampled token, as a per-token figure."""
    tokens = mask.sum(1).float()
    metrics = {f"{prefix}accuracy": float(scores.mean()),
               f"{prefix}entropy": float((entropy * tokens).sum() / tokens.sum().clamp(min=1)),
               f"{prefix}format_rate": float(tagged.mean())}
    metrics.update({f"{prefix}pass@{k}": pass_at_k(scores, k) for k in ks})
    return metrics
