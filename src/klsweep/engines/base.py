"""The interface between a rollout engine and the training loop."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from klsweep.rollout import Prompts, Rollout


class RolloutEngine(Protocol):
    """Samples completions from the policy as of its last ``load_weights``.

    ``sample`` returns a ``Rollout`` whose ``old_logp`` are the engine's log-probabilities
    of its tokens (temperature applied); an engine other than the trainer's own model also
    sets ``engine_logp`` to them, so that the trainer measures the mismatch and can correct
    for it (``engines/correction.py``)."""

    def sample(self, prompts: Prompts, n_per_prompt: int) -> Rollout: ...

    def load_weights(self, policy: nn.Module) -> None: ...
