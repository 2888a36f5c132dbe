"""The native engine: klsweep's batched decoding loop with a KV cache (``rollout.generate``)
over the policy module itself, so its weights are always the trainer's."""

from __future__ import annotations

from torch import nn

from klsweep.engines.base import InProcess
from klsweep.rollout import Prompts, Rollout, generate
from klsweep.sharding import gathered


class NativeEngine(InProcess):
    """Samples with the live policy module: ``load_weights`` has nothing to copy, and the
    log-probs of the samples are the trainer's own (no ``engine_logp``, no mismatch)."""

    def __init__(self, policy: nn.Module, *, temperature: float, max_new_tokens: int,
                 eos_id: int) -> None:
        self.policy = policy
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id

    def sample(self, prompts: Prompts, n_per_prompt: int) -> Rollout:
        """In eval mode; the policy's mode is restored after, whatever it was, and when
        sampling fails."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with gathered(self.policy):  # sharded (trainer=fsdp): gathered once, not per token
                return generate(self.policy, prompts, n_per_prompt=n_per_prompt,
                                max_new_tokens=self.max_new_tokens, eos_id=self.eos_id,
                                temperature=self.temperature)
        finally:
            self.policy.train(was_training)

    def load_weights(self, policy: nn.Module) -> None:
        """Nothing to copy: the engine samples with the module the trainer updates."""
