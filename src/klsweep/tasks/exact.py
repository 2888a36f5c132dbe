"""The exact task: completions few enough to enumerate, so that KL, reward, the optimum of the
KL-regularised objective and the reward–KL frontier are computed exactly, not sampled.

Language: ``n_prompts`` fixed prompts of ``prompt_len`` tokens, then a completion of exactly
``completion_len`` tokens over a vocabulary of ``vocab_size``. Each token follows the previous
one (the prompt's last token for the first) by +1 (mod V) with probability ``p_step``, else it
is uniform. The reference is the tiny model trained on this language for a few seconds and
cached, so π_ref is smooth and far from uniform.

Reward: the mean token value divided by V − 1, in [0, 1], times ``reward_scale``, the same
for every prompt. The reference scores about half the scale; the all-(V−1) completion scores
the full scale, and the chain wraps V − 1 to 0, so the reward pulls against the reference at
every position and the best trade-off depends on how each token changes the next ones.
Scaling the reward and β alike leaves π* unchanged; a larger scale makes Bradley–Terry
preference labels (DPO) more informative.

Support: there is no EOS. ``eos_id`` is V, outside the vocabulary, so the sampler never emits
it and every sampled completion has exactly ``completion_len`` tokens: the sampler's support
is exactly the V^L enumerated completions.

Every ``eval_every`` steps and at the last one, ``evaluate`` computes the policy's and the
reference's log-probability of every completion of every prompt by teacher forcing (one
batched forward per model over the V^(L−1) prefixes: the last position gives all V last
tokens at once) and logs ``exact/*`` (see klsweep.exact_math). ``finalize`` writes the last
evaluation to ``exact.json``, from which every figure can be recomputed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from omegaconf import DictConfig
from torch import Tensor, nn

from klsweep.exact_math import enumerate_completions, exact_metrics
from klsweep.models.reference import ReferenceRecipe
from klsweep.policy import PolicyPair
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError, spec
from klsweep.tasks.base import Task

# rows per forward when enumerating: bounds activation memory for large vocabularies
_ROWS_PER_FORWARD = 16384
# settings that do not shape the reference model, left out of its cache key
_NOT_REFERENCE = ("name", "cache_dir", "eval_every", "reward_scale")
# every evaluation enumerates n_prompts × vocab_size**completion_len sequences
MAX_SEQUENCES = 2**18


@dataclass
class ExactConfig:
    """``task=exact`` (defaults: conf/task/exact.yaml)."""

    name: str = spec(kind="choice", choices=("exact",), help="the task")
    vocab_size: int = spec(kind="integer", ge=2, help="tokens (V)")
    completion_len: int = spec(kind="integer", ge=1, help="completion length (L), no EOS")
    prompt_len: int = spec(kind="integer", ge=1, help="prompt length")
    n_prompts: int = spec(kind="integer", ge=1, help="distinct prompts")
    p_step: float = spec(kind="number", ge=0, le=1, help="P(next token = previous + 1 mod V)")
    reward_scale: float = spec(kind="number", gt=0, help="reward = scale × mean token / (V − 1)")
    eval_every: int = spec(kind="integer", ge=1, help="steps between exact evaluations")
    prompt_seed: int = spec(kind="integer", ge=0, help="seed of the prompt set")
    reference_steps: int = spec(kind="integer", ge=1, help="reference training steps")
    reference_batch_size: int = spec(kind="integer", ge=1, help="reference training batch")
    reference_lr: float = spec(kind="number", gt=0, help="reference training learning rate")
    reference_seed: int = spec(kind="integer", ge=0, help="reference training seed")
    cache_dir: str = spec(kind="string", help="where trained references are cached")

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        task = cfg.task
        prompts = task.vocab_size ** task.prompt_len
        if task.n_prompts > prompts:
            raise ConfigError(f"task.n_prompts must be <= task.vocab_size**task.prompt_len = "
                              f"{prompts} distinct prompts (got {task.n_prompts})")
        sequences = task.n_prompts * task.vocab_size ** task.completion_len
        if sequences > MAX_SEQUENCES:
            raise ConfigError(f"task.n_prompts × task.vocab_size**task.completion_len must be "
                              f"<= {MAX_SEQUENCES} to enumerate (got {sequences})")


@dataclass
class ExactEvaluation:
    """One exact evaluation: the step after whose update it ran, the coefficient it used,
    the [X, Y] tables of sequence log-probabilities, and the figures."""

    step: int
    beta_seq: float
    policy_logp: NDArray[np.float64]
    ref_logp: NDArray[np.float64]
    metrics: dict[str, float]


class ExactTask(Task):
    name = "exact"
    Config = ExactConfig

    def __init__(self, config: ExactConfig) -> None:
        self.config = config
        self.vocab_size = config.vocab_size
        self.eos_id = config.vocab_size  # outside the vocabulary: never sampled (see above)
        self.prompt_len = config.prompt_len
        self.max_new_tokens = config.completion_len
        self.prompts = self._prompt_set()
        self.completions = torch.from_numpy(
            enumerate_completions(config.vocab_size, config.completion_len))
        self.rewards = self.completion_reward(
            self.completions, torch.ones_like(self.completions, dtype=torch.bool)).double()
        self.last_evaluation: ExactEvaluation | None = None

    def _prompt_set(self) -> Tensor:
        """``n_prompts`` distinct prompts [n_prompts, prompt_len], fixed by ``prompt_seed``."""
        c = self.config
        generator = torch.Generator().manual_seed(c.prompt_seed)
        codes = torch.randperm(c.vocab_size ** c.prompt_len, generator=generator)[:c.n_prompts]
        powers = c.vocab_size ** torch.arange(c.prompt_len - 1, -1, -1)
        return (codes[:, None] // powers) % c.vocab_size

    # --- the language and the reward ------------------------------------------------------------
    def _prompt_tokens(self, n: int, generator: torch.Generator) -> Tensor:
        return self.prompts[torch.randint(0, len(self.prompts), (n,), generator=generator)]

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        return Prompts.unpadded(self._prompt_tokens(n, generator))

    def sample_sequences(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Prompts and completions of the language: tokens [n, P+L] and the mask of the
        next-token targets to learn (the completion's tokens)."""
        c = self.config
        prompts = self._prompt_tokens(n, generator)
        completion = torch.empty(n, c.completion_len, dtype=torch.long)
        prev = prompts[:, -1]
        for t in range(c.completion_len):
            step = torch.rand(n, generator=generator) < c.p_step
            uniform = torch.randint(0, c.vocab_size, (n,), generator=generator)
            prev = torch.where(step, (prev + 1) % c.vocab_size, uniform)
            completion[:, t] = prev
        tokens = torch.cat([prompts, completion], dim=1)
        targets = torch.cat([torch.zeros(n, c.prompt_len - 1),
                             torch.ones(n, c.completion_len)], dim=1)
        return tokens, targets

    def completion_reward(self, completions: Tensor, mask: Tensor) -> Tensor:
        """The mean token value of each completion [B, N] over ``mask``, scaled to
        [0, reward_scale]."""
        values = torch.where(mask, completions, 0).sum(1).float()
        scale = self.config.reward_scale / (self.vocab_size - 1)
        return scale * values / mask.sum(1).clamp(min=1).float()

    def reward(self, rollout: Rollout) -> Tensor:
        return self.completion_reward(rollout.completions, rollout.mask)

    def reference_recipe(self) -> ReferenceRecipe:
        c = self.config
        language = {k: v for k, v in asdict(c).items() if k not in _NOT_REFERENCE}
        return ReferenceRecipe(
            key={"task": self.name, "language": language},
            sample_batch=lambda g: self.sample_sequences(c.reference_batch_size, g),
            steps=c.reference_steps, lr=c.reference_lr, seed=c.reference_seed,
            cache_dir=c.cache_dir)

    # --- exact evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def sequence_logprobs(self, model: nn.Module, temperature: float = 1.0,
                          ) -> NDArray[np.float64]:
        """log π(y|x) of every completion of every prompt, [X, V^L] float64, by teacher
        forcing: each prompt + prefix of L−1 tokens is one row, whose positions give the
        prefix's tokens and, at the last position, every possible last token."""
        V, L, P = self.vocab_size, self.max_new_tokens, self.prompt_len
        prefixes = self.completions[::V, : L - 1]  # lexicographic order: every V-th row
        n_prompts, n_prefixes = len(self.prompts), len(prefixes)
        device = next(model.parameters()).device
        tokens = torch.cat([self.prompts.repeat_interleave(n_prefixes, dim=0),
                            prefixes.repeat(n_prompts, 1)], dim=1).to(device)
        was_training = model.training
        model.eval()
        rows = []
        for chunk in tokens.split(_ROWS_PER_FORWARD):
            logits = model(chunk)[:, P - 1:].double() / temperature  # [rows, L, V]
            logp_all = torch.log_softmax(logits, dim=-1)
            prefix = logp_all[:, : L - 1].gather(-1, chunk[:, P:, None]).squeeze(-1).sum(-1)
            rows.append(prefix[:, None] + logp_all[:, L - 1])  # [rows, V]
        model.train(was_training)
        return torch.cat(rows).reshape(n_prompts, n_prefixes * V).cpu().numpy()

    def should_evaluate(self, step: int, total_steps: int) -> bool:
        return (step + 1) % self.config.eval_every == 0 or step + 1 == total_steps

    def evaluate(self, pair: PolicyPair, step: int, beta_seq: float) -> dict[str, float]:
        # the reference's table is recomputed, not cached: one forward, and never stale
        ref_logp = self.sequence_logprobs(pair.reference, pair.temperature)
        policy_logp = self.sequence_logprobs(pair.policy, pair.temperature)
        rewards = np.broadcast_to(self.rewards.numpy(), policy_logp.shape)
        metrics = exact_metrics(policy_logp, ref_logp, rewards, beta_seq)
        self.last_evaluation = ExactEvaluation(step, float(beta_seq), policy_logp, ref_logp,
                                               metrics)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The last evaluation, which exact.json is written from: a run resumed after it
        (killed between its last step and its record) writes the same file."""
        last = self.last_evaluation
        if last is None:
            return {}
        return {"last_evaluation": {
            "step": last.step, "beta_seq": last.beta_seq, "metrics": last.metrics,
            "policy_logp": torch.from_numpy(last.policy_logp),
            "ref_logp": torch.from_numpy(last.ref_logp)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = state.get("last_evaluation")
        if last is not None:
            self.last_evaluation = ExactEvaluation(
                last["step"], last["beta_seq"], last["policy_logp"].numpy(),
                last["ref_logp"].numpy(), last["metrics"])

    def finalize(self, pair: PolicyPair, run_dir: Path) -> None:
        """Write the last evaluation to ``exact.json``: per prompt every completion with its
        reference and policy log-probability and its reward, and ``beta_seq``."""
        last = self.last_evaluation
        if last is None:
            return
        completions = self.completions.tolist()
        rewards = self.rewards.tolist()
        payload = {
            "step": last.step,
            "beta_seq": last.beta_seq,
            "temperature": float(pair.temperature),
            "task": asdict(self.config) | {"cache_dir": None},
            "metrics": last.metrics,
            "prompts": [
                {"prompt": prompt, "completions": completions, "reward": rewards,
                 "ref_logp": ref.tolist(), "policy_logp": policy.tolist()}
                for prompt, ref, policy in zip(self.prompts.tolist(), last.ref_logp,
                                               last.policy_logp, strict=True)],
        }
        path = Path(run_dir) / "exact.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, allow_nan=True))
        os.replace(tmp, path)
