"""Rollout engines: what samples the completions a step trains on. The algorithms and the
policy pair see only the ``RolloutEngine`` interface; ``rollout.engine`` picks one here.

* ``native``: klsweep's own batched decoding loop over the policy module (``rollout.py``).
* ``vllm``: a vLLM ``LLM`` in the training process (colocated, as TRL's
  ``vllm_mode="colocate"``), which receives the policy's weights every
  ``rollout.sync_every`` rollouts (``engines/vllm.py``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from klsweep.engines.base import RolloutEngine
from klsweep.engines.correction import mismatch_metrics, tis_weights
from klsweep.engines.native import NativeEngine
from klsweep.schema import ConfigError

ENGINES = ("native", "vllm")

__all__ = ["ENGINES", "NativeEngine", "RolloutEngine", "build_engine", "check_engine",
           "mismatch_metrics", "tis_weights"]


def check_engine(cfg: Any) -> None:
    """What ``rollout.engine`` needs of the rest of the config, checked before training (the
    model's architecture is checked when the engine starts, also before training)."""
    if cfg.rollout.engine != "vllm":
        return
    if cfg.model.kind != "hf":
        raise ConfigError(f"rollout.engine=vllm needs model=hf, a transformers model vLLM can "
                          f"load (got model={cfg.model.kind})")
    if cfg.model.name is None:
        raise ConfigError("rollout.engine=vllm needs model.name, a checkpoint vLLM loads "
                          "(a directory or hub id; got null)")
    if cfg.trainer.get("strategy") not in ("auto", None):
        # a colocated engine per rank would join the ranks' process group (vLLM's
        # external_launcher backend, as TRL's colocate mode under accelerate): not built here
        raise ConfigError(f"rollout.engine=vllm runs one engine in one training process "
                          f"(trainer.strategy auto; got {cfg.trainer.strategy}): an engine per "
                          f"rank is not built")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine=vllm needs vLLM, which is not installed (GPU: pip "
                          "install 'klsweep[vllm]'; CPU: scripts/vllm_cpu_env.sh DIR)")


def build_engine(rollout: Any, model: Any, policy: nn.Module, *, max_new_tokens: int,
                 eos_id: int, seed: int) -> RolloutEngine:
    """The engine ``rollout.engine`` names, sampling from ``policy`` at the rollout's
    temperature; ``model`` is the model node (vLLM loads its checkpoint)."""
    if rollout.engine == "native":
        return NativeEngine(policy, temperature=rollout.temperature,
                            max_new_tokens=max_new_tokens, eos_id=eos_id)
    if rollout.engine == "vllm":
        from klsweep.engines.vllm import VLLMEngine  # vLLM takes seconds to import

        return VLLMEngine(model, rollout, max_new_tokens=max_new_tokens, eos_id=eos_id,
                          seed=seed)
    raise ConfigError(f"rollout.engine must be one of {', '.join(ENGINES)} "
                      f"(got {rollout.engine!r})")
