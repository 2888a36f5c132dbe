"""Rollout engines: what samples the completions a step trains on. The algorithms and the
policy pair see only the ``RolloutEngine`` interface; ``rollout.engine`` picks one here, and
``rollout.lag`` where it runs.

* ``native``: klsweep's own batched decoding loop over the policy module (``rollout.py``).
* ``vllm``: a vLLM ``LLM`` in the training process (colocated, as TRL's
  ``vllm_mode="colocate"``), which receives the policy's weights every
  ``rollout.sync_every`` rollouts (``engines/vllm.py``).
* either in a process of its own, sampling ``rollout.lag`` steps ahead of the trainer
  (``engines/lagged.py``, ``engines/worker.py``).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

from torch import Tensor, nn

from klsweep.engines.base import RolloutEngine
from klsweep.engines.correction import (
    Correction,
    PolicyGradientCorrection,
    mismatch_metrics,
    tis_weights,
)
from klsweep.engines.native import NativeEngine
from klsweep.schema import ConfigError

ENGINES = ("native", "vllm")

__all__ = ["ENGINES", "Correction", "NativeEngine", "PolicyGradientCorrection", "RolloutEngine",
           "build_engine", "check_engine", "mismatch_metrics", "tis_weights"]


def check_engine(cfg: Any) -> None:
    """What ``rollout.engine`` and ``rollout.lag`` need of the rest of the config, checked
    before training (the model's architecture is checked when the engine starts, also before
    training)."""
    _check_lag(cfg)
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


def _check_lag(cfg: Any) -> None:
    rollout = cfg.rollout
    if rollout.correction == "decoupled" and rollout.lag == 0:
        raise ConfigError("rollout.correction=decoupled clips against the policy one step "
                          "behind, which the samples of a synchronous run are not: it needs "
                          "rollout.lag >= 1 (got 0)")
    if rollout.lag == 0:
        return
    if cfg.algo.name not in ("grpo", "ppo"):
        raise ConfigError(f"rollout.lag={rollout.lag} samples a rollout a step ahead of the "
                          f"trainer, which algo=grpo and algo=ppo take (got algo={cfg.algo.name})")
    if cfg.trainer.get("strategy") not in ("auto", None):
        raise ConfigError(f"rollout.lag={rollout.lag} runs one engine process beside one "
                          f"training process (trainer.strategy auto; got "
                          f"{cfg.trainer.strategy}): an engine per rank, each sent its rank's "
                          f"weights and prompts, is not built")
    if rollout.sync_every != 1:
        raise ConfigError(f"rollout.sync_every must be 1 with rollout.lag={rollout.lag}: the "
                          f"lag says which weights sample (got {rollout.sync_every})")


def build_engine(rollout: Any, model: Any, policy: nn.Module, *, max_new_tokens: int,
                 eos_id: int, seed: int) -> RolloutEngine:
    """The engine ``rollout.engine`` names, sampling from ``policy`` at the rollout's
    temperature, in this process, or with ``rollout.lag`` > 0 in its own; ``model`` is the
    model node (vLLM loads its checkpoint)."""
    if rollout.engine not in ENGINES:
        raise ConfigError(f"rollout.engine must be one of {', '.join(ENGINES)} "
                          f"(got {rollout.engine!r})")
    if getattr(rollout, "lag", 0) > 0:
        return _lagged(rollout, model, policy, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       seed=seed)
    if rollout.engine == "native":
        return NativeEngine(policy, temperature=rollout.temperature,
                            max_new_tokens=max_new_tokens, eos_id=eos_id)
    from klsweep.engines.vllm import VLLMEngine  # vLLM takes seconds to import

    return VLLMEngine(model, rollout, max_new_tokens=max_new_tokens, eos_id=eos_id, seed=seed)


def _trainable(policy: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in policy.named_parameters() if p.requires_grad}


def _hf_weights(policy: nn.Module) -> dict[str, Tensor]:
    from klsweep.engines.vllm import hf_weights

    return dict(hf_weights(policy.model))


def _lagged(rollout: Any, model: Any, policy: nn.Module, **sizes: Any) -> RolloutEngine:
    """The engine of ``rollout.engine`` in a process of its own, ``rollout.lag`` steps
    ahead: ``native`` on a copy of the policy, ``vllm`` on the checkpoint."""
    from klsweep.engines.lagged import LaggedEngine
    from klsweep.engines.worker import EngineSpec

    device = str(next(policy.parameters()).device)
    spec = EngineSpec(rollout.engine, rollout.temperature, sizes["max_new_tokens"],
                      sizes["eos_id"], sizes["seed"], rollout.threads, device)
    if rollout.engine == "native":
        spec.policy = copy.deepcopy(policy).cpu()
        return LaggedEngine(spec, lag=rollout.lag, payload=_trainable)
    spec.model = {key: model[key] for key in ("name", "revision", "dtype", "trust_remote_code")}
    spec.rollout = {key: rollout[key] for key in ("temperature", "kv_cache_gib", "enforce_eager",
                                                  "gpu_memory_utilization")}
    return LaggedEngine(spec, lag=rollout.lag, payload=_hf_weights)

