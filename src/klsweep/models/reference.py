"""Reference models made by a task's own recipe (the synthetic tasks): maximum likelihood
on the task's language, for any model of the interface, cached on disk by a hash of
everything that shapes it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("klsweep")

@dataclass
class ReferenceRecipe:
    """How a synthetic task makes its reference: ``steps`` of maximum likelihood at ``lr``
    on batches from ``sample_batch`` (tokens [B, T], loss mask [B, T-1]), from ``seed``.
    ``key`` holds every task setting that shapes the result (the cache key)."""

    key: dict[str, Any]
    sample_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    steps: int
    lr: float
    seed: int
    cache_dir: str


def pretrained_reference(model: nn.Module, model_key: dict[str, Any],
                         recipe: ReferenceRecipe) -> nn.Module:
    """``model`` trained by ``recipe`` (or loaded from the cache), in eval mode; ``model_key``
    describes the architecture for the cache key."""

    def train(m: nn.Module) -> None:
        train_language_model(m, recipe.sample_batch, steps=recipe.steps, lr=recipe.lr,
                             seed=recipe.seed)

    return cached_model(recipe.cache_dir, {**recipe.key, "model": model_key}, model, train)


# Part of every cache key: bump it when the way a cached model is made changes.
RECIPE_VERSION = 2


def cached_model(cache_dir: str | os.PathLike, key: dict[str, Any], model: nn.Module,
                 train: Callable[[nn.Module], None]) -> nn.Module:
    """Load into ``model`` the weights that ``train`` produces for ``key`` from
    ``cache_dir``, or train it and cache them. The file name is a hash of the key, so a
    change of any setting retrains; the write is atomic, so parallel trials never read half
    a file."""
    key = {**key, "recipe": RECIPE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / f"{key.get('task', 'model')}-{digest[:16]}.pt"
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as err:  # a truncated or corrupt file: make it again
            log.warning("klsweep: the cached reference %s is unreadable (%s: %s); retraining",
                        path, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    # Training must neither depend on nor move the run's random state: the same run then
    # gives the same result whether its reference came from the cache or was trained now.
    with torch.random.fork_rng(devices=[]):
        train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def train_language_model(model: nn.Module,
                         sample_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]], *,
                         steps: int, lr: float, seed: int) -> None:
    """Maximum-likelihood training on sequences from ``sample_batch`` -> (tokens [B, T],
    loss mask [B, T-1] over next-token targets). AdamW with a cosine decay. The model's
    ``init_weights`` draws its initial weights from ``seed`` too."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.init_weights()
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
