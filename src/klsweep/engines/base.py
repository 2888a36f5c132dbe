"""The interface between a rollout engine and the training loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch import nn

from klsweep.rollout import Prompts, Rollout


class RolloutEngine(Protocol):
    """Samples completions from the policy as of its last ``load_weights``.

    ``sample`` returns a ``Rollout`` whose ``old_logp`` are the engine's log-probabilities
    of its tokens (temperature applied); an engine other than the trainer's own model also
    sets ``engine_logp`` to them, so that the trainer measures the mismatch and can correct
    for it (``engines/correction.py``). An engine that samples ahead of the trainer
    (``rollout.lag`` > 0, ``engines/lagged.py``) returns the rollout of ``prompts`` that it
    sampled with older weights, reads the prompts of the rollouts after it from
    ``look_ahead``, keeps them in ``state_dict`` for a resumed run and ends its process in
    ``close``; an engine in the trainer's process has nothing of that (``InProcess``)."""

    def sample(self, prompts: Prompts, n_per_prompt: int) -> Rollout: ...

    def load_weights(self, policy: nn.Module) -> None: ...

    def look_ahead(self, prompts: Iterator[Prompts]) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class InProcess:
    """What an engine that samples in the trainer's process, when asked, has of the
    interface beyond ``sample`` and ``load_weights``: nothing sampled ahead, nothing to log,
    to save or to end."""

    def look_ahead(self, prompts: Iterator[Prompts]) -> None:
        """Nothing is sampled ahead: the prompts come with each ``sample``."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
