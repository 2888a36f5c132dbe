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
reference's log-probability of every completion of every prompt by teacher forcing (batched
forwards over the V^(L−1) prefixes, at most ``_ROWS_PER_FORWARD`` rows each: the last
position gives all V last tokens at once) and logs ``exact/*`` (see klsweep.exact_math),
``exact/pass@k`` among them for each k of ``eval.k``: 1 − (1 − p)^k with p the policy's
probability of a completion of top reward, averaged over prompts (klsweep.pass_at_k).
``finalize`` writes the last evaluation to ``exact.json``, from which every figure can be
recomputed, and the exact best-of-n curve over π_ref (n = 1, 2, 4, …, 64), the
inference-time baseline beside the frontier.

With ``reward_source=proxy`` the policy optimises a reward model trained on gold-labelled
pairs of the language's samples (klsweep.tasks.proxy). Its score of every completion of every
prompt is one table, computed once, so the exact figures stay exact. Two questions, so two
sets of figures. ``exact/*`` as with the gold reward, but on the proxy: J, J*,
π* ∝ π_ref·exp(r_proxy/β), the frontier and its gap describe the problem the policy is
solving, and how well the KL schedule and the algorithm solve it. Beside them
``exact/gold_reward`` (E_π[r_gold]) and ``exact/proxy_reward`` (E_π[r_proxy], the same as
``exact/reward``): what solving it buys in the reward one cares about, which rises and then
falls as KL grows when the proxy is over-optimised. With the gold reward, J*, π* and the
frontier are the gold reward's, and neither extra key is logged. exact.json holds the
optimised reward's table as ``reward`` and, with the proxy, the gold one as ``gold_reward``.
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

from klsweep.exact_divergence import divergence_metrics
from klsweep.exact_math import (
    BEST_OF_N,
    best_of_n_curve,
    best_of_n_kl_bound,
    best_of_n_logp,
    enumerate_completions,
    exact_metrics,
    expected_reward,
    sequence_kl,
)
from klsweep.models.reference import ReferenceRecipe
from klsweep.pass_at_k import exact_pass_at_k
from klsweep.policy import PolicyPair
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError, from_node, spec
from klsweep.tasks.base import SyntheticTaskConfig, Task
from klsweep.tasks.evaluation import EvalConfig
from klsweep.tasks.proxy import ProxyConfig, ProxyReward, check_proxy

# rows per forward when enumerating: bounds activation memory for large vocabularies
_ROWS_PER_FORWARD = 16384
# settings that do not shape the reference model, left out of its cache key
_NOT_REFERENCE = ("name", "cache_dir", "eval_every", "reward_scale", "reward_source", "proxy")
# every evaluation enumerates n_prompts × vocab_size**completion_len sequences
MAX_SEQUENCES = 2**18


@dataclass
class ExactConfig(SyntheticTaskConfig):
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

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        check_proxy(cfg)
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
    needs_evaluation = True  # for eval.k: the exact pass@k

    def __init__(self, config: ExactConfig, evaluation: EvalConfig | None = None) -> None:
        self.config = config
        self.evaluation = evaluation
        self.vocab_size = config.vocab_size
        self.eos_id = config.vocab_size  # outside the vocabulary: never sampled (see above)
        self.prompt_len = config.prompt_len
        self.max_new_tokens = config.completion_len
        self.prompts = self._prompt_set()
        self.completions = torch.from_numpy(
            enumerate_completions(config.vocab_size, config.completion_len))
        self.rewards = self.completion_reward(
            self.completions, torch.ones_like(self.completions, dtype=torch.bool)).double()
        self.proxy_config = from_node(ProxyConfig, config.proxy)
        self.proxy = None if config.reward_source == "gold" else ProxyReward(
            self.proxy_config, key={"task": self.name, **self._shaping()},
            cache_dir=config.cache_dir, vocab_size=self.vocab_size,
            prompt_len=self.prompt_len, block_size=self.prompt_len + self.max_new_tokens,
            sample_pairs=self.sample_pairs, gold=self.completion_reward)
        self.gold_table = np.broadcast_to(self.rewards.numpy(),
                                          (len(self.prompts), len(self.completions)))
        # [X, Y]: the reward the policy optimises, of every completion of every prompt
        self.reward_table = self.gold_table if self.proxy is None else self._proxy_table()
        self.last_evaluation: ExactEvaluation | None = None
        self._frozen_logp: NDArray[np.float64] | None = None  # see frozen_logprobs

    def _shaping(self) -> dict:
        """The settings that shape the language and the gold reward (the proxy's cache key)."""
        c = self.config
        language = {k: v for k, v in asdict(c).items() if k not in _NOT_REFERENCE}
        return {"language": language, "reward_scale": c.reward_scale}

    def _proxy_table(self) -> NDArray[np.float64]:
        n_prompts, n_completions = len(self.prompts), len(self.completions)
        tokens = torch.cat([self.prompts.repeat_interleave(n_completions, dim=0),
                            self.completions.repeat(n_prompts, 1)], dim=1)
        mask = torch.ones(len(tokens), self.max_new_tokens, dtype=torch.bool)
        scores = torch.cat([self.proxy.score(t, m) for t, m in
                            zip(tokens.split(_ROWS_PER_FORWARD), mask.split(_ROWS_PER_FORWARD),
                                strict=True)])
        return scores.double().reshape(n_prompts, n_completions).numpy()

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
        tokens, _ = self._complete(self._prompt_tokens(n, generator), generator)
        targets = torch.cat([torch.zeros(n, c.prompt_len - 1),
                             torch.ones(n, c.completion_len)], dim=1)
        return tokens, targets

    def sample_pairs(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pairs of completions of the language, rows 2i and 2i+1 of one prompt: tokens
        [2n, P+L] and the completion mask [2n, L] (all true)."""
        return self._complete(self._prompt_tokens(n, generator).repeat_interleave(2, dim=0),
                              generator)

    def _complete(self, prompts: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Completions of ``prompts`` [n, P] from the language: tokens [n, P+L] and the
        completion mask [n, L]."""
        c, n = self.config, len(prompts)
        completion = torch.empty(n, c.completion_len, dtype=torch.long)
        prev = prompts[:, -1]
        for t in range(c.completion_len):
            step = torch.rand(n, generator=generator) < c.p_step
            uniform = torch.randint(0, c.vocab_size, (n,), generator=generator)
            prev = torch.where(step, (prev + 1) % c.vocab_size, uniform)
            completion[:, t] = prev
        return (torch.cat([prompts, completion], dim=1),
                torch.ones(n, c.completion_len, dtype=torch.bool))

    def completion_reward(self, completions: Tensor, mask: Tensor) -> Tensor:
        """The mean token value of each completion [B, N] over ``mask``, scaled to
        [0, reward_scale]."""
        values = torch.where(mask, completions, 0).sum(1).float()
        scale = self.config.reward_scale / (self.vocab_size - 1)
        return scale * values / mask.sum(1).clamp(min=1).float()

    def reward(self, rollout: Rollout) -> Tensor:
        if self.proxy is None:
            return self.completion_reward(rollout.completions, rollout.mask)
        return self.proxy(rollout)

    def reward_metrics(self, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        """With the proxy: ``reward/proxy`` (``rewards``, what the policy optimised) and
        ``reward/gold`` of the batch; nothing more with the gold reward (``reward/mean``)."""
        return {} if self.proxy is None else self.proxy.metrics(rollout, rewards)

    def reference_recipe(self) -> ReferenceRecipe:
        key = {"task": self.name, "language": self._shaping()["language"]}
        return self.config.reference_recipe(key, self.sample_sequences)

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

    def frozen_logprobs(self, pair: PolicyPair) -> NDArray[np.float64]:
        """The table of the model that never changes during a run: the reference, or with a
        moving reference the initial model. Computed at the first evaluation only: it was a
        quarter of a 40-step trial's time when every evaluation redid it."""
        if self._frozen_logp is None:
            frozen = pair.reference if pair.initial is None else pair.initial
            self._frozen_logp = self.sequence_logprobs(frozen, pair.temperature)
        return self._frozen_logp

    def evaluate(self, pair: PolicyPair, step: int, beta_seq: float) -> dict[str, float]:
        initial_logp = self.frozen_logprobs(pair)
        ref_logp = (initial_logp if pair.initial is None
                    else self.sequence_logprobs(pair.reference, pair.temperature))
        policy_logp = self.sequence_logprobs(pair.policy, pair.temperature)
        metrics = exact_metrics(policy_logp, ref_logp, self.reward_table, beta_seq)
        # scored against the optimum of the run's own divergence and unit (exact/kl stays KL)
        metrics.update(divergence_metrics(pair.divergence, pair.kl.unit, policy_logp, ref_logp,
                                          self.reward_table, beta_seq, self.vocab_size, metrics))
        # the drift from the initial model, which a moving reference no longer is
        metrics["exact/kl_to_init"] = metrics["exact/kl"] if pair.initial is None else float(
            sequence_kl(policy_logp, initial_logp).mean())
        if self.evaluation is not None:
            p_top = self.top_probability(policy_logp)
            metrics.update({f"exact/pass@{k}": exact_pass_at_k(p_top, k)
                            for k in self.evaluation.k})
        if self.proxy is not None:
            metrics["exact/proxy_reward"] = metrics["exact/reward"]
            metrics["exact/gold_reward"] = float(
                expected_reward(policy_logp, self.gold_table).mean())
        self.last_evaluation = ExactEvaluation(step, float(beta_seq), policy_logp, ref_logp,
                                               metrics)
        return metrics

    def top_probability(self, logp: NDArray[np.float64]) -> NDArray[np.float64]:
        """π(top|x) [X] under the table ``logp`` [X, Y]: the probability of a completion with
        the prompt's top gold reward (what pass@k asks at least one of k samples to reach)."""
        top = self.gold_table >= self.gold_table.max(axis=1, keepdims=True)
        return (np.exp(logp) * top).sum(axis=1)

    def best_of_n(self, ref_logp: NDArray[np.float64]) -> dict[str, list[float]]:
        """The exact best-of-n policies over π_ref for n in ``BEST_OF_N``, choosing by the
        reward the policy optimises: n, KL per sequence (and its bound log n − (n−1)/n) and
        mean reward; with the proxy also the gold reward of the proxy's choice (Gao et al.'s
        best-of-n over-optimisation)."""
        ns, kls, rewards = best_of_n_curve(ref_logp, self.reward_table, BEST_OF_N)
        table = {"n": ns.tolist(), "kl": kls.tolist(), "reward": rewards.tolist(),
                 "kl_bound": [best_of_n_kl_bound(int(n)) for n in ns]}
        if self.proxy is not None:
            table["gold_reward"] = [
                float(expected_reward(best_of_n_logp(ref_logp, self.reward_table, int(n)),
                                      self.gold_table).mean()) for n in ns]
        return table

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
        reference and policy log-probability and its reward (the one optimised; with the
        proxy also the gold one), ``beta_seq``, and the best-of-n table."""
        last = self.last_evaluation
        if last is None:
            return
        completions = self.completions.tolist()
        prompts = []
        for x, (prompt, ref, policy) in enumerate(zip(self.prompts.tolist(), last.ref_logp,
                                                      last.policy_logp, strict=True)):
            row = {"prompt": prompt, "completions": completions,
                   "reward": self.reward_table[x].tolist(), "ref_logp": ref.tolist(),
                   "policy_logp": policy.tolist()}
            if self.proxy is not None:
                row["gold_reward"] = self.gold_table[x].tolist()
            prompts.append(row)
        payload = {
            "step": last.step,
            "beta_seq": last.beta_seq,
            "temperature": float(pair.temperature),
            "reward_source": self.config.reward_source,
            "divergence": {"name": pair.divergence.name, "unit": pair.kl.unit,
                           "alpha": getattr(pair.divergence, "alpha", None)},
            "task": asdict(self.config) | {"cache_dir": None,
                                           "proxy": asdict(self.proxy_config)},
            "metrics": last.metrics,
            "best_of_n": self.best_of_n(last.ref_logp),
            "prompts": prompts,
        }
        path = Path(run_dir) / "exact.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, allow_nan=True))
        os.replace(tmp, path)
