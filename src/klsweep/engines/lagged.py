"""``rollout.lag`` = K > 0: the engine samples in a process of its own (``engines/worker.py``)
while the trainer trains, and the rollout of step t is always the one sampled with the
weights of step max(0, t − K) (verl's one-step-off recipe and PipelineRL's fixed lag), so
that a run is deterministic and resumes exactly.

The schedule, in the trainer's calls (the policy pair's ``sample``: ``load_weights``, then
``sample``): at step t the trainer pushes the weights of step t, asks for the rollout of step
t + K on the prompts that step will draw (read ahead from ``look_ahead``), and takes the
rollout of step t, sampled earlier; at the first step it asks for the rollouts of steps
0..K, all with the first weights. While the trainer trains on the rollout of step t, the
engine samples the one of step t + K. A checkpoint holds the rollouts sampled for the next K
steps (``state_dict`` waits for the one in flight), so a resumed run takes the same ones and
asks for the next with the same weights.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from klsweep.engines.shared import WeightRing, decode, encode, state_of
from klsweep.engines.worker import EngineSpec, serve
from klsweep.errors import RunFailed
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError

_POLL_S = 0.2     # how often a waiting trainer checks that the engine process lives
_STOP_S = 10.0    # how long a stopping engine process has before it is terminated


class EngineDied(RunFailed):
    """The engine process ended while the trainer waited for a rollout."""


def _how(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _shut(process: Any, requests: Any, rings: list[WeightRing]) -> None:
    """Stop the engine process: asked, then terminated, then killed (never left behind);
    then free the weights' shared memory."""
    if process.is_alive():
        try:
            requests.put(("stop",))
        except (OSError, ValueError):  # the queue is closed: the process is told otherwise
            pass
        process.join(_STOP_S)
    for end in (process.terminate, process.kill):
        if process.is_alive():
            end()
            process.join(_STOP_S)
    requests.cancel_join_thread()  # nothing left in it is of use to anyone
    for ring in rings:
        ring.close()


class LaggedEngine:
    """The trainer's side of the engine process: pushes weights, asks for rollouts ahead,
    hands them out in order, and times both sides. ``payload`` gives the tensors the engine
    needs of the policy (``native``: its trainable parameters; ``vllm``: its weights under
    their HF names, a LoRA adapter merged)."""

    def __init__(self, spec: EngineSpec, *, lag: int,
                 payload: Callable[[nn.Module], dict[str, Tensor]]) -> None:
        context = torch.multiprocessing.get_context("spawn")
        self.requests, self.results = context.Queue(), context.Queue()
        self.process = context.Process(target=serve, name="klsweep-engine",
                                       args=(spec, self.requests, self.results, os.getpid()))
        self.process.start()
        self.rings: list[WeightRing] = []  # one, made at the first push
        self._finalizer = weakref.finalize(self, _shut, self.process, self.requests, self.rings)
        self.lag, self.payload = lag, payload
        self.step = 0        # the step whose rollout ``sample`` hands out next
        self.requested = 0   # the step whose rollout is asked for next
        self.pushed = -1     # the step whose weights went last
        self.ready: dict[int, Rollout] = {}
        self.prompts_ahead: Iterator[Prompts] | None = None
        self.n_per_prompt: int | None = None
        self._timing = {"engine_busy_s": 0.0, "engine_idle_s": 0.0}
        self._metrics: dict[str, float] = {}
        self._returned: float | None = None
        self._started()

    def _started(self) -> None:
        """Wait for the engine to be built; what it refuses to run is a ConfigError (one
        line, before training)."""
        message = self._next("its start")
        if message[0] == "refused":
            self.close()
            raise ConfigError(message[1])
        if message[0] != "ready":
            self.close()
            raise ConfigError(f"rollout.lag: the engine process could not start: {message[1]}")

    # --- the protocol ------------------------------------------------------------------------
    def look_ahead(self, prompts: Iterator[Prompts]) -> None:
        """The prompts of every step from the next ``sample``'s on."""
        self.prompts_ahead = prompts

    def load_weights(self, policy: nn.Module) -> None:
        """The weights of the step whose rollout is handed out next, to sample the rollout
        ``lag`` steps later with (once per step)."""
        if self.pushed >= self.step:
            return
        payload = self.payload(policy)
        if not self.rings:
            self.rings.append(WeightRing.for_payload(payload, slots=self.lag + 2))
        ring = self.rings[0]
        slot = self.step % ring.slots  # free: see engines/shared.py
        ring.write(slot, payload)
        self.requests.put(("weights", self.step, ring.handle, slot))
        self.pushed = self.step

    def sample(self, prompts: Prompts, n_per_prompt: int) -> Rollout:
        """The rollout of this step (of ``prompts``), sampled ``lag`` steps ago; first ask for
        the ones up to ``lag`` steps ahead that are not yet asked for."""
        called = time.perf_counter()
        if self.prompts_ahead is None:
            raise RuntimeError("rollout.lag: the engine needs the prompts ahead (look_ahead)")
        self.n_per_prompt = self.n_per_prompt or n_per_prompt
        while self.requested <= self.step + self.lag:
            ahead = next(self.prompts_ahead, None)
            if ahead is None:  # the run's last steps: nothing more to sample
                break
            if self.requested not in self.ready:  # a resumed run holds some already
                prompts_ahead = encode(state_of(ahead.to(torch.device("cpu"))))
                self.requests.put(("sample", self.requested, prompts_ahead, self.n_per_prompt))
            self.requested += 1
        rollout = self._take(self.step)
        if not torch.equal(rollout.prompts[::n_per_prompt].cpu(), prompts.tokens.cpu()):
            raise RuntimeError(f"rollout.lag: the rollout sampled for step {self.step} is of "
                               f"other prompts than the step's")
        returned = time.perf_counter()
        self._metrics = {
            "rollout/lag": float(self.step - rollout.version),
            "perf/trainer_busy_s": 0.0 if self._returned is None else called - self._returned,
            "perf/trainer_idle_s": returned - called,
            **{f"perf/{key}": value for key, value in self._timing.items()}}
        self._timing = dict.fromkeys(self._timing, 0.0)
        self._returned = returned
        self.step += 1
        return rollout.to(prompts.tokens.device)

    def metrics(self) -> dict[str, float]:
        """The last rollout's lag (its step minus its weights' step), and since the rollout
        before it: the trainer's busy and idle (waiting) seconds, and the engine's."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        """The next step, and the rollouts sampled for it and the steps after (up to ``lag``
        of them): the one in flight is waited for."""
        for index in range(self.step, self.requested):
            self._take(index, keep=True)
        return {"step": self.step,
                "rollouts": {str(i): state_of(r) for i, r in sorted(self.ready.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.requested = state["step"]
        self.ready = {int(i): Rollout(**values) for i, values in state["rollouts"].items()}

    def close(self) -> None:
        """Stop the engine process (waits for it; a later close does nothing)."""
        self._finalizer()

    # --- receiving ---------------------------------------------------------------------------
    def _take(self, index: int, keep: bool = False) -> Rollout:
        """The rollout of step ``index``, waited for; handed out (dropped) unless ``keep``."""
        while index not in self.ready:
            message = self._next(f"the rollout of step {index}")
            if message[0] == "error":
                raise RunFailed(f"the rollout engine failed at step {index}: {message[1]}")
            _, received, rollout, busy, idle = message
            self.ready[received] = Rollout(**decode(rollout))
            self._timing["engine_busy_s"] += busy
            self._timing["engine_idle_s"] += idle
        return self.ready[index] if keep else self.ready.pop(index)

    def _next(self, what: str) -> tuple:
        """The engine's next message; an engine process that ends first ends the run."""
        while True:
            try:
                return self.results.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise EngineDied(
                        f"the rollout engine's process (pid {self.process.pid}) died "
                        f"({_how(self.process)}) before {what}; the last checkpoint is intact: "
                        f"the same command resumes the run") from None
