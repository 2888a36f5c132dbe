"""A proxy reward model for over-optimisation experiments (Gao, Schulman & Hilton 2022):
``task.reward_source=proxy`` makes a synthetic task's policy optimise a learnt reward instead
of the task's own (the *gold* reward), which it then measures beside it.

Data: ``pairs`` preference pairs, two completions of one prompt each, drawn from the task's
own language sampler (the distribution the reference is trained on, so equivalent to π_ref's
samples up to the reference's fit, and needing no model), labelled by Bradley–Terry sampling
on the gold reward, P(a ≻ b) = σ(r_a − r_b), as DPO's offline labels are.

Model: a tiny causal transformer read at the last completion token, the shape of the reward
models of InstructGPT and of Gao et al. (a language model with a scalar head), trained with
the Bradley–Terry loss −log σ(s_chosen − s_rejected). Why not something simpler: a table of
per-completion scores memorises the pairs and knows nothing of completions they lack, and a
linear bag-of-tokens model contains the gold reward of both tasks (a mean of token values),
so that with enough pairs it *is* the gold reward and pushing on it never hurts. The
transformer fits noisy labels with features of its own, which agree with the gold reward
where the reference puts its samples and extrapolate freely where it rarely does, which is
where a policy optimising it hard goes: the imperfection that makes gold reward peak and fall
as KL grows. More pairs give a better proxy and a later, higher peak (Gao et al.'s scaling
with reward-model data).

The model is made once per run, before the policy: its weights start from ``seed``, its pairs
and labels come from a generator of that seed, and all of it runs inside a forked random state
(``cached_model``), so a proxy run draws the same random numbers for its policy as the gold
run of the same seed. It is cached on disk like the reference, keyed by everything that
shapes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from klsweep.models.reference import cached_model
from klsweep.preferences import bradley_terry_labels, bradley_terry_loss
from klsweep.rollout import Rollout
from klsweep.schema import ConfigError, spec

# (completions [B, N], completion mask [B, N]) -> gold reward [B]
GoldReward = Callable[[Tensor, Tensor], Tensor]
# (n, generator) -> tokens [2n, P+N] and completion mask [2n, N]: rows 2i, 2i+1 share a prompt
PairSampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass
class ProxyConfig:
    """``task.proxy``: the proxy reward model, used with ``task.reward_source=proxy``."""

    pairs: int = spec(kind="integer", ge=1, help="gold-labelled preference pairs it learns from")
    steps: int = spec(kind="integer", ge=1, help="training steps (Bradley–Terry loss)")
    batch_size: int = spec(kind="integer", ge=1, help="pairs per training step")
    lr: float = spec(kind="number", gt=0, help="AdamW learning rate")
    seed: int = spec(kind="integer", ge=0, help="seed of its pairs, labels and initial weights")
    n_layer: int = spec(kind="integer", ge=1, help="transformer blocks")
    n_head: int = spec(kind="integer", ge=1, help="attention heads")
    n_embd: int = spec(kind="integer", ge=1, help="width (a multiple of n_head)")


def check_proxy(cfg: DictConfig) -> None:
    """The ``task.proxy`` check that spans two of its keys (its fields are checked as a node
    of ``SyntheticTaskConfig``)."""
    proxy = cfg.task.proxy
    if proxy.n_embd % proxy.n_head:
        raise ConfigError(f"task.proxy.n_embd must be a multiple of task.proxy.n_head "
                          f"(got {proxy.n_embd} and {proxy.n_head})")


class RewardModel(nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, and a scalar head
    on the final hidden state of each sequence's last completion token."""

    def __init__(self, vocab_size: int, block_size: int, config: ProxyConfig) -> None:
        super().__init__()
        width = config.n_embd
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        block = nn.TransformerEncoderLayer(width, config.n_head, 4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, config.n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, tokens: Tensor, last: Tensor) -> Tensor:
        """Scores [B] of ``tokens`` [B, T], read at position ``last`` [B] of each row; causal
        attention keeps the tokens after it (padding past EOS) out of the score."""
        T = tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device)
        x = self.ln_f(self.blocks(x, mask=causal, is_causal=True))
        return self.head(x[torch.arange(len(tokens), device=tokens.device), last]).squeeze(-1)


def last_positions(mask: Tensor, prompt_len: int) -> Tensor:
    """The position [B] of each row's last completion token (EOS where there is one), from
    the completion mask [B, N]."""
    return prompt_len + mask.sum(1) - 1


def train_reward_model(model: RewardModel, tokens: Tensor, last: Tensor, chosen_first: Tensor,
                       *, steps: int, batch_size: int, lr: float,
                       generator: torch.Generator) -> None:
    """``steps`` of AdamW on the Bradley–Terry loss over minibatches of the pairs (rows 2i,
    2i+1 of ``tokens``; ``chosen_first`` [n]: whether row 2i is the preferred one)."""
    first = 2 * torch.arange(len(chosen_first))
    chosen = torch.where(chosen_first, first, first + 1)
    rejected = 2 * first + 1 - chosen
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(chosen), (min(batch_size, len(chosen)),),
                              generator=generator)
        c, r = chosen[batch], rejected[batch]
        loss = bradley_terry_loss(model(tokens[c], last[c]), model(tokens[r], last[r]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


class ProxyReward:
    """A task's proxy reward model, trained (or loaded from ``cache_dir``) at construction.
    ``key`` holds every task setting that shapes the pairs and their labels (the language and
    the gold reward); the proxy's own settings are added to it."""

    def __init__(self, config: ProxyConfig, *, key: dict[str, Any], cache_dir: str,
                 vocab_size: int, prompt_len: int, block_size: int,
                 sample_pairs: PairSampler, gold: GoldReward) -> None:
        self.config = config
        self.prompt_len = prompt_len
        self.gold = gold
        with torch.random.fork_rng(devices=[]):  # the initial weights too leave the run's RNG
            torch.manual_seed(config.seed)
            model = RewardModel(vocab_size, block_size, config)

        def train(m: nn.Module) -> None:
            generator = torch.Generator().manual_seed(config.seed)
            tokens, mask = sample_pairs(config.pairs, generator)
            gold_rewards = gold(tokens[:, prompt_len:], mask)
            chosen_first = bradley_terry_labels(gold_rewards[0::2], gold_rewards[1::2],
                                                generator)
            train_reward_model(m, tokens, last_positions(mask, prompt_len), chosen_first,
                               steps=config.steps, batch_size=config.batch_size,
                               lr=config.lr, generator=generator)

        key = {**key, "task": f"{key.get('task', 'task')}-proxy", "proxy": asdict(config)}
        self.model = cached_model(cache_dir, key, model, train).requires_grad_(False)

    @torch.no_grad()
    def score(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Proxy reward [B] of prompt + completion ``tokens`` [B, P+N] with completion mask
        [B, N]."""
        self.model.to(tokens.device)
        return self.model(tokens, last_positions(mask, self.prompt_len)).float()

    def __call__(self, rollout: Rollout) -> Tensor:
        return self.score(rollout.tokens, rollout.mask)

    def metrics(self, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        """``reward/proxy`` (the rewards the policy optimised) and ``reward/gold`` of a batch."""
        gold = self.gold(rollout.completions, rollout.mask)
        return {"reward/proxy": float(rewards.mean()), "reward/gold": float(gold.mean())}
