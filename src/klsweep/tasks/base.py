"""What every task gives the trainer: prompts, a reward, and a reference policy."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klsweep.models.tiny import TinyGPT, TinyGPTConfig


class Task:
    """A prompt distribution, a reward on completions and the reference policy π_ref."""

    name = "base"
    vocab_size: int
    eos_id: int
    prompt_len: int
    max_new_tokens: int

    def sample_prompts(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` prompts [n, prompt_len] (long)."""
        raise NotImplementedError

    def reward(self, completions: Tensor, mask: Tensor) -> Tensor:
        """Task reward [B] of completions [B, N] whose tokens ``mask`` [B, N] marks."""
        raise NotImplementedError

    def reference_model(self, model_config: dict[str, Any]) -> TinyGPT:
        """A trained reference policy (cached on disk); the policy starts as its copy."""
        raise NotImplementedError

    def should_evaluate(self, step: int, total_steps: int) -> bool:
        """Whether ``evaluate`` runs after update ``step`` (0-based) of ``total_steps``."""
        return False

    def evaluate(self, module: Any, beta_seq: float) -> dict[str, float]:
        """Extra metrics of the current policy (the exact task's ``exact/*``); ``beta_seq``
        is the coefficient on sequence-level KL that the algorithm applies."""
        return {}

    def finalize(self, module: Any, run_dir: Path) -> None:
        """Write the task's own record of the run into ``run_dir`` after fit (the exact
        task's ``exact.json``); called whether the run completed or failed."""

    def model_config(self, model_config: dict[str, Any]) -> TinyGPTConfig:
        return TinyGPTConfig(vocab_size=self.vocab_size,
                             block_size=self.prompt_len + self.max_new_tokens, **model_config)


# Part of every cache key: bump it when the way a cached model is made changes.
RECIPE_VERSION = 2


def cached_model(cache_dir: str | os.PathLike, key: dict[str, Any], config: TinyGPTConfig,
                 train: Callable[[TinyGPT], None]) -> TinyGPT:
    """Load the model that ``train`` produces for ``key`` from ``cache_dir``, or train it and
    cache it. The file name is a hash of the key, so a change of any setting retrains; the
    write is atomic, so parallel trials never read half a file."""
    key = {**key, "recipe": RECIPE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / f"{key.get('task', 'model')}-{digest[:16]}.pt"
    model = TinyGPT(config)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    # Training must neither depend on nor move the run's random state: the same run then
    # gives the same result whether its reference came from the cache or was trained now.
    with torch.random.fork_rng(devices=[]):
        train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def train_language_model(model: TinyGPT,
                         sample_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]], *,
                         steps: int, lr: float, seed: int) -> None:
    """Maximum-likelihood training on sequences from ``sample_batch`` -> (tokens [B, T],
    loss mask [B, T-1] over next-token targets). AdamW with a cosine decay."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.apply(model._init_weights)  # the initial weights come from ``seed`` too
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        tokens, loss_mask = sample_batch(generator)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        loss = (loss * loss_mask.reshape(-1)).sum() / loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_at.step()
    model.eval()
