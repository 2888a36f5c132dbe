"""The policy pair: the policy being trained, its frozen reference, the KL settings and the
sampling temperature, and what every algorithm does with them — sample, score a rollout
under both models, the KL values and the loss-placed KL term, the statistics each step logs.

No Lightning here: the pair is tested alone on CPU, and algorithms see only the pair.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from klsweep.engines import (
    Correction,
    NativeEngine,
    PolicyGradientCorrection,
    RolloutEngine,
    mismatch_metrics,
)
from klsweep.kl import (
    DIVERGENCES,
    ESTIMATORS,
    forms,
    kl_estimates,
    kl_metrics,
    kl_per_token,
    make_divergence,
    masked_mean,
    masked_sum,
)
from klsweep.models.base import CausalLM
from klsweep.rollout import (
    Prompts,
    Rollout,
    completion_logits,
    generate,
    tempered,
    token_entropy,
    token_logprobs,
)
from klsweep.schema import ConfigError, from_node, spec
from klsweep.sharding import gathered

PLACEMENTS = ("reward", "loss", "none")
UNITS = ("token", "sequence")
GRADIENTS = ("estimator", "k2")
CORRECTIONS = (forms.AUTO, True, False, forms.SEQUENCE)


@dataclass(frozen=True)
class ReferenceSync:
    """``kl.reference``: a moving reference (TR-DPO, Gorbatovski et al. 2024; TRL's
    ``sync_ref_model``): every ``sync_every`` steps π_ref ← (1−α)·π_ref + α·π_θ."""

    sync_every: int = spec(kind="integer", ge=0, help="steps between syncs; 0: frozen")
    mix: float = spec(kind="number", gt=0, le=1, help="α of the soft update; 1: a hard copy")


@dataclass(frozen=True)
class KLConfig:
    """The ``kl`` node: β and its schedule, how the KL is estimated and where it acts."""

    beta: float = spec(kind="number", ge=0, help="initial β (the schedule moves it)")
    target: float = spec(kind="number", ge=0, help="target KL, in kl.unit")
    placement: str = spec(kind="choice", choices=PLACEMENTS,
                          help="where the KL acts; each algorithm sets its default")
    estimator: str = spec(kind="choice", choices=ESTIMATORS,
                          help="KL estimator in the penalty and kl/mean")
    unit: str = spec(kind="choice", choices=UNITS,
                     help="token: mean per token | sequence: sum per sequence")
    gradient: str = spec(kind="choice", choices=GRADIENTS,
                         help="k2: the estimator's value with k2's gradient (verl's k3+)")
    is_correction: bool | str = spec(kind="choice", choices=CORRECTIONS,
                                     help="loss-placed KL times π/π_old with its gradient (true: "
                                          "the token's; sequence: up to the token); auto: where "
                                          "it makes the term a reverse-KL gradient (k1, k3)")
    clamp: float = spec(kind="number", gt=0, help="log-ratio clamp before k2/k3")
    divergence: str = spec(kind="choice", choices=tuple(DIVERGENCES),
                           help="the regulariser D_f(π‖π_ref); reverse_kl: the KL")
    alpha: float = spec(kind="number", gt=0, lt=1,
                        help="α of divergence=alpha, TRL's convention (→1 reverse, →0 forward KL)")
    beta_min: float = spec(kind="number", ge=0, help="lower bound of β")
    beta_max: float = spec(kind="number", gt=0, help="upper bound of β")
    max: float = spec(kind="number", gt=0, help="a KL (kl.unit) above it ends the run as diverged")
    schedule: dict = spec(kind="node", help="the β schedule (the schedule group fills it)")
    reference: ReferenceSync = spec(kind="node", help="a moving reference (kl.reference.*)")

    def __post_init__(self) -> None:
        if not isinstance(self.reference, ReferenceSync):
            object.__setattr__(self, "reference", from_node(ReferenceSync, self.reference))
        if self.is_correction == forms.AUTO:  # the audit's table decides (kl.forms)
            object.__setattr__(self, "is_correction", self.divergence == "reverse_kl" and (
                forms.default_correction(self.placement, self.estimator, self.gradient)))

    @staticmethod
    def check_run(cfg: Any) -> None:
        if cfg.kl.placement == "none":
            return  # nothing is penalised: the estimator only measures
        lag = cfg.rollout.lag
        try:
            make_divergence(cfg.kl.divergence, cfg.kl.alpha).check(kl_settings(cfg.kl, lag), lag)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def kl_settings(node: Any, lag: int = 0) -> KLConfig:
    """The ``kl`` node as a run at ``rollout.lag`` = ``lag`` trains with it: an ``auto``
    correction is the audit table's choice off-policy where the rollouts are stale (lag > 0),
    on-policy otherwise (as ``KLConfig`` alone takes it)."""
    kl = from_node(KLConfig, node)
    if lag > 0 and node["is_correction"] == forms.AUTO:
        kl = replace(kl, is_correction=kl.divergence == "reverse_kl" and forms.default_correction(
            kl.placement, kl.estimator, kl.gradient, off_policy=True))
    return kl


@dataclass
class Scored:
    """A rollout with the policy's and the reference's view of its completion tokens:
    logits [B, N, vocab] (temperature applied) and log-probs [B, N]. The policy's carry
    their gradient when the rollout was scored with one. ``features``: the policy's final
    hidden states [B, N, C] from the same pass, without gradient, when asked for.
    ``behaviour_logp``: the sampling policy's log-probs where it is some steps behind the
    policy (``rollout.lag`` > 0), None where the samples are the policy's."""

    rollout: Rollout
    logits: Tensor
    logp: Tensor
    ref_logits: Tensor
    ref_logp: Tensor
    features: Tensor | None = None
    behaviour_logp: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        return self.rollout.mask

    def kl_old_logp(self, old_logp: Tensor) -> Tensor:
        """What the KL term's correction divides by (π_old): the policy that sampled, so that
        the ratio moves its expectation from the samples' policy to π_θ; on-policy that is the
        step's own ``old_logp``."""
        return old_logp if self.behaviour_logp is None else self.behaviour_logp

    def rows(self, index: Tensor, group_size: int = 1) -> Scored:
        return Scored(self.rollout.rows(index, group_size), self.logits[index], self.logp[index],
                      self.ref_logits[index], self.ref_logp[index],
                      None if self.features is None else self.features[index],
                      None if self.behaviour_logp is None else self.behaviour_logp[index])


@dataclass
class Measurement:
    """What one batch of fresh samples says: the metrics every step logs (``kl/*``,
    ``reward/*``, ``policy/*``, ``perf/*``), the KL in ``kl.unit`` that the schedule
    steers, and how many samples it was measured on (0: nothing new, β stays)."""

    metrics: dict[str, float]
    kl: float
    n_samples: int

    def carried(self) -> Measurement:
        """The same figures, carried to a step that sampled nothing."""
        return Measurement({**self.metrics, "perf/samples": 0.0, "perf/tokens": 0.0},
                           self.kl, 0)


def _check_movable(policy: nn.Module, reference: nn.Module) -> None:
    """A moving reference is mixed with the policy parameter by parameter: refuse, before
    training, a reference whose parameters are not the policy's (another checkpoint)."""
    shapes = {name: p.shape for name, p in policy.named_parameters()}
    ref_shapes = {name: p.shape for name, p in reference.named_parameters()}
    if ref_shapes != shapes:
        differing = sorted(name for name in shapes.keys() | ref_shapes.keys()
                           if shapes.get(name) != ref_shapes.get(name))
        raise ConfigError(f"kl.reference.sync_every mixes the policy into the reference "
                          f"parameter by parameter, but the reference's parameters are not "
                          f"the policy's ({', '.join(differing[:2])}); a model.reference_name "
                          f"of another shape needs sync_every=0")


class PolicyPair:
    """π_θ and π_ref, and the operations on them that the algorithms share. With a moving
    reference (``kl.reference.sync_every`` > 0) it also keeps the initial model, so that
    ``kl/to_init`` measures the drift users care about while ``kl/mean`` is the penalised KL
    to the current reference."""

    def __init__(self, policy: CausalLM, reference: CausalLM, kl: KLConfig, *,
                 temperature: float, max_new_tokens: int, eos_id: int,
                 engine: RolloutEngine | None = None, sync_every: int = 1,
                 correction: str = "none", cap: float | None = None, lag: int = 0) -> None:
        self.policy = policy
        self.reference = reference
        self.kl = kl
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        # what samples the policy's completions (rollout.engine), the rollouts between weight
        # syncs into it, how many steps its weights lag (rollout.lag), and the importance
        # weights on the policy-gradient term for another sampler's samples (rollout.correction)
        self.engine = engine or NativeEngine(policy, temperature=temperature,
                                             max_new_tokens=max_new_tokens, eos_id=eos_id)
        self.sync_every = sync_every
        self.lag = lag
        self.correction = PolicyGradientCorrection(correction, cap, policy, temperature)
        self._rollouts = 0
        self.divergence = make_divergence(kl.divergence, kl.alpha)
        if kl.reference.sync_every > 0:
            _check_movable(policy, reference)
        self.initial = (copy.deepcopy(reference).requires_grad_(False)
                        if kl.reference.sync_every > 0 else None)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, prompts: Prompts, n_per_prompt: int) -> Rollout:
        """``n_per_prompt`` completions of each prompt from the policy, through the engine.
        Its weights are the policy's at the first rollout of this process (a resumed run's
        included) and then every ``sync_every`` rollouts."""
        if self._rollouts % self.sync_every == 0:
            self.engine.load_weights(self.policy)
        self._rollouts += 1
        return self.engine.sample(prompts, n_per_prompt)

    def look_ahead(self, prompts: Iterator[Prompts]) -> None:
        """The prompts of the steps to come, for an engine that samples ahead (rollout.lag)."""
        self.engine.look_ahead(prompts)

    def close(self) -> None:
        """End the engine's own process, if it has one."""
        self.engine.close()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the models: the rollouts sampled ahead, π_prox."""
        return {"engine": self.engine.state_dict(), "correction": self.correction.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state.get("engine", {}))
        self.correction.load_state_dict(state.get("correction", {}))

    def sample_reference(self, prompts: Prompts, n_per_prompt: int,
                         max_rows: int | None = None) -> Rollout:
        """Completions from π_ref as the run began (an offline preference data set): with a
        moving reference, the initial model, so that a resumed run draws the same set.
        ``max_rows``: decode at most that many rows at a time, with the same tokens."""
        start = self.reference if self.initial is None else self.initial
        start.eval()
        with gathered(start):
            return self._generate(start, prompts, n_per_prompt, max_rows)

    def _generate(self, model: nn.Module, prompts: Prompts, n_per_prompt: int,
                  max_rows: int | None = None) -> Rollout:
        return generate(model, prompts, n_per_prompt=n_per_prompt,
                        max_new_tokens=self.max_new_tokens, eos_id=self.eos_id,
                        temperature=self.temperature, max_rows=max_rows)

    # --- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """π_ref's logits and log-probs of the completion tokens."""
        return self._frozen_logprobs(self.reference, rollout)

    def _frozen_logprobs(self, model: nn.Module, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """A frozen model's (π_ref's, the initial model's) logits and log-probs of the
        completion tokens, in eval mode."""
        model.eval()
        logits = completion_logits(model, rollout, self.temperature)
        return logits, token_logprobs(logits, rollout.completions)

    def policy_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """π_θ's logits and log-probs of the completion tokens, with gradient when enabled."""
        logits = completion_logits(self.policy, rollout, self.temperature)
        return logits, token_logprobs(logits, rollout.completions)

    def policy_logprobs_and_features(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """``policy_logprobs`` and, from the same pass of the trunk, the policy's final hidden
        states [B, N, C] at the positions that predict each completion token (the states a
        value head reads), without gradient."""
        raw, hidden = self.policy.completion_logits_and_hidden(
            rollout.tokens, rollout.attention_mask, rollout.prompt_len, rollout.group_size)
        logits = tempered(raw, self.temperature)
        return logits, token_logprobs(logits, rollout.completions), hidden.detach()

    def score(self, rollout: Rollout, *, grad: bool = True, features: bool = False) -> Scored:
        """Both models' log-probs of ``rollout`` (each shared prompt computed once per group);
        the policy's with gradient unless ``grad`` is false, and its ``features`` from the
        same pass when asked for."""
        ref_logits, ref_logp = self.reference_logprobs(rollout)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if features:
                logits, logp, hidden = self.policy_logprobs_and_features(rollout)
            else:
                (logits, logp), hidden = self.policy_logprobs(rollout), None
        behaviour = None
        if rollout.engine_logp is not None:
            # sampled by another engine: π_old is the trainer's own view of the tokens (verl's
            # recomputed old log-probs); the engine's serve the mismatch metrics and the
            # correction, and with a lag are the behaviour policy's
            rollout = replace(rollout, old_logp=logp.detach() * rollout.mask)
            behaviour = rollout.engine_logp if self.lag > 0 else None
        return Scored(rollout, logits, logp, ref_logits, ref_logp, hidden, behaviour)

    def pg_correction(self, scored: Scored) -> Correction:
        """The importance weights [B, N] on the policy-gradient term (rollout.correction; the
        KL term has its own, kl.is_correction), and for ``decoupled`` the proximal policy's
        log-probs that the clip is taken against; nothing where the trainer's model sampled."""
        return self.correction(scored.rollout, scored.rollout.old_logp)

    @torch.no_grad()
    def sync_reference(self) -> None:
        """The soft update π_ref ← (1−α)·π_ref + α·π_θ, parameter by parameter (TR-DPO);
        α = 1 copies the policy."""
        mix = self.kl.reference.mix
        policy = dict(self.policy.named_parameters())
        for name, ref_param in self.reference.named_parameters():
            ref_param.lerp_(policy[name].detach(), mix)

    def due_for_sync(self, step: int) -> bool:
        """Whether the reference moves after update ``step`` (0-based)."""
        every = self.kl.reference.sync_every
        return every > 0 and (step + 1) % every == 0

    # --- the KL ------------------------------------------------------------------------------
    @torch.no_grad()
    def reward_penalty(self, logp: Tensor, ref_logp: Tensor, logits: Tensor,
                       ref_logits: Tensor, mask: Tensor) -> Tensor:
        """The configured divergence's per-token penalty [B, N] that β times leaves the
        reward (the KL's: the configured estimator's values)."""
        return self.divergence.reward_penalty(logp, ref_logp, mask, self.kl, logits, ref_logits)

    def kl_loss_term(self, logp: Tensor, ref_logp: Tensor, logits: Tensor, ref_logits: Tensor,
                     old_logp: Tensor, mask: Tensor | None = None) -> Tensor:
        """The per-token term of a loss [B, N] for the configured divergence, with its
        gradient through log π_θ (the other divergences need the completion ``mask``)."""
        if mask is None:
            mask = torch.ones_like(logp, dtype=torch.bool)
        return self.divergence.loss_term(logp, ref_logp, old_logp, mask, self.kl, logits,
                                         ref_logits)

    # --- what a step logs --------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, scored: Scored, rewards: Tensor) -> Measurement:
        """Reward, KL (every estimator, from this batch) and policy statistics of fresh
        samples."""
        rollout, mask = scored.rollout, scored.mask
        logits, logp = scored.logits.detach(), scored.logp.detach()
        estimates = kl_estimates(logp, scored.ref_logp, self.kl.estimator, logits=logits,
                                 ref_logits=scored.ref_logits, clamp=self.kl.clamp)
        metrics = kl_metrics(logp, scored.ref_logp, mask, self.kl.estimator, logits=logits,
                             estimates=estimates)
        distinct = len({tuple(row) for row in rollout.completions.tolist()})
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/max": float(rewards.max()),
            "policy/entropy": float(masked_mean(token_entropy(logits), mask)),
            "policy/length": float(mask.sum(1).float().mean()),
            "policy/distinct": distinct / rewards.numel(),
            "perf/samples": float(rewards.numel()),
            "perf/tokens": float(mask.sum()),
        })
        metrics["kl/to_init"] = (metrics["kl/mean"] if self.initial is None
                                 else self._kl_to_initial(scored))
        if rollout.engine_logp is not None:  # the native engine's are the trainer's own
            metrics.update(mismatch_metrics(logp, rollout.engine_logp, mask))
        metrics.update(self.engine.metrics())  # an engine sampling ahead: its lag and timing
        # the configured divergence is what β steers (the KL's: kl/mean's values, not again)
        values = self.divergence.values(logp, scored.ref_logp, mask, self.kl, logits,
                                        scored.ref_logits,
                                        kl_estimate=estimates[self.kl.estimator])
        metrics["kl/divergence"] = float(masked_mean(values, mask))
        metrics["kl/divergence_seq"] = float(masked_sum(values, mask).mean())
        kl = metrics["kl/divergence" if self.kl.unit == "token" else "kl/divergence_seq"]
        return Measurement(metrics, kl, rewards.numel())

    def _kl_to_initial(self, scored: Scored) -> float:
        """The configured estimator's mean per token against the initial model."""
        init_logits, init_logp = self._frozen_logprobs(self.initial, scored.rollout)
        kl = kl_per_token(scored.logp.detach(), init_logp, self.kl.estimator,
                          logits=scored.logits.detach(), ref_logits=init_logits,
                          clamp=self.kl.clamp)
        return float(masked_mean(kl, scored.mask))
