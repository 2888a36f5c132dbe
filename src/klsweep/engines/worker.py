"""The engine process of ``rollout.lag`` > 0: it builds an engine (``native``: over its own
copy of the policy; ``vllm``: a vLLM ``LLM`` from the checkpoint), then serves the trainer's
messages in the order sent, on two queues of ``torch.multiprocessing``:

* ``("weights", version, ring, slot)``: load the policy's weights of step ``version`` from
  ``slot`` of the shared-memory ring ``ring`` (``engines/shared.py``);
* ``("sample", index, prompts, n)``: sample the rollout of step ``index`` with the weights
  loaded last, its random draws seeded from the run's seed and ``index`` alone, so that the
  rollout is the same whatever ran before it in this process (a resumed run's included);
* ``("stop",)``: end.

It answers ``("ready",)`` once built (or ``("refused", reason)`` for a model the engine
cannot run, ``("error", reason)`` for anything else), then ``("rollout", index, rollout,
busy_s, idle_s)`` per rollout: the seconds it worked on the messages since the last rollout,
and the seconds it waited for them. Prompts and rollouts cross as bytes.

The process ignores SIGINT and SIGTERM, which a terminal or a scheduler sends to every
process of the job: the trainer, which gets them too, checkpoints (with the rollouts this
process has sampled ahead) and then stops it. It dies with the trainer (Linux's parent-death
signal), so that a trainer killed with SIGKILL leaves no engine behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from klsweep.engines.shared import WeightRing, decode, encode, state_of
from klsweep.rollout import Prompts
from klsweep.schema import ConfigError

_PR_SET_PDEATHSIG = 1


@dataclass
class EngineSpec:
    """What the engine process builds: ``kind`` native over ``policy`` (a CPU copy, moved to
    ``device``), or vllm from the ``model`` and ``rollout`` nodes' values."""

    kind: str
    temperature: float
    max_new_tokens: int
    eos_id: int
    seed: int
    threads: int
    device: str = "cpu"
    policy: nn.Module | None = None
    model: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)


def sample_seed(seed: int, index: int) -> int:
    """The seed of rollout ``index``'s draws: a function of the run's seed and the index."""
    return seed * 2**32 + index


def _build(spec: EngineSpec) -> tuple[Any, Any]:
    """The engine and the function that loads unpacked weights into it."""
    if spec.kind == "native":
        from klsweep.engines.native import NativeEngine

        policy = spec.policy.to(spec.device).eval()
        params = dict(policy.named_parameters())

        @torch.no_grad()
        def load(weights: dict[str, Tensor]) -> None:
            for name, tensor in weights.items():
                params[name].copy_(tensor)

        return NativeEngine(policy, temperature=spec.temperature,
                            max_new_tokens=spec.max_new_tokens, eos_id=spec.eos_id), load
    if spec.device == "cpu":
        # vLLM's CPU worker binds its OpenMP threads to cores: to the last ``threads`` ones,
        # none reserved, so that the trainer keeps the others (unless the user said otherwise)
        cores = os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              f"{max(0, cores - spec.threads)}-{cores - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from klsweep.engines.vllm import VLLMEngine

    engine = VLLMEngine(SimpleNamespace(**spec.model), SimpleNamespace(**spec.rollout),
                        max_new_tokens=spec.max_new_tokens, eos_id=spec.eos_id, seed=spec.seed)
    return engine, lambda weights: engine.load_named(iter(weights.items()))


def _die_with_parent() -> None:
    """Signals for the trainer, not for this process; and death with the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _reason(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0] or type(err).__name__


def serve(spec: EngineSpec, requests: Any, results: Any, parent: int) -> None:
    """The engine process's main: build, then serve ``requests`` until told to stop."""
    _die_with_parent()
    if os.getppid() != parent:  # the trainer died before the signal was armed
        return
    torch.set_num_threads(spec.threads)
    try:
        engine, load = _build(spec)
    except ConfigError as err:
        results.put(("refused", str(err)))
        return
    except BaseException as err:
        results.put(("error", f"{type(err).__name__}: {_reason(err)}"))
        return
    results.put(("ready",))
    version, busy, idle, ring = None, 0.0, 0.0, None
    while True:
        waited = time.perf_counter()
        message = requests.get()
        started = time.perf_counter()
        idle += started - waited
        try:
            if message[0] == "stop":
                return
            if message[0] == "weights":
                _, version, handle, slot = message
                ring = ring if ring is not None and ring.handle == handle else WeightRing(*handle)
                load(ring.views(slot))
            else:
                _, index, prompts, n = message
                torch.manual_seed(sample_seed(spec.seed, index))
                prompts = Prompts(**decode(prompts)).to(torch.device(spec.device))
                rollout = engine.sample(prompts, n).to(torch.device("cpu"))
                # the engine's log-probs are the behaviour policy's: the trainer recomputes its
                # own and corrects by their ratio (engines/correction.py)
                rollout = replace(rollout, engine_logp=rollout.old_logp, version=version)
                busy += time.perf_counter() - started
                results.put(("rollout", index, encode(state_of(rollout)), busy, idle))
                busy = idle = 0.0
                continue
        except BaseException as err:
            results.put(("error", f"{type(err).__name__}: {_reason(err)}"))
            sys.exit(1)
        busy += time.perf_counter() - started
