"""The KL term's gradient as training forms it, and the target gradients, as functions of one
scored batch: each gives a per-sequence scalar f [B] whose parameter gradient is that
sequence's ĝ, so that ∇θ Σ_y w_y·f_y is the w-weighted mean gradient (one backward).

The estimated gradient calls training's own code: ``PolicyPair.kl_loss_term`` (the estimator,
``kl.gradient`` and ``kl.is_correction``) in the loss, ``PolicyPair.reward_penalty`` in the reward,
so the audit breaks when training's KL code breaks. Signs: every ĝ is that of a quantity to
minimise (β dropped), the KL's share of the training loss's gradient.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from klsweep.kl import forms, full_kl, masked_sum
from klsweep.kl.f_terms import sum_after
from klsweep.policy import UNITS, PolicyPair


@dataclass(frozen=True)
class Variant:
    """One way training can form the KL term: estimator × placement × kl.gradient ×
    kl.is_correction (× kl.unit, which scales the term and not its direction)."""

    estimator: str
    placement: str
    gradient: str
    is_correction: bool
    unit: str


def variants(refused: bool = False) -> list[Variant]:
    """A row per form of the audit's table (``kl.forms``) and unit: every form training
    accepts, and with ``refused`` the forms it refuses too (the table's evidence)."""
    chosen = forms.FOLLOWS if refused else forms.accepted_forms()
    return [Variant(f.estimator, f.placement, f.gradient, f.is_correction, u)
            for u in UNITS for f in chosen]


@dataclass
class Batch:
    """Sequences scored for the audit: the current policy's logits and log-probs (with
    gradient), the reference's, and the sampling policy's (π_old) log-probs and logits, each
    [B, N(, V)], with the completion ``mask`` [B, N]."""

    logits: Tensor
    logp: Tensor
    ref_logits: Tensor
    ref_logp: Tensor
    old_logits: Tensor
    old_logp: Tensor
    mask: Tensor

    def positions(self, mask: Tensor) -> Batch:
        """The same batch with only ``mask``'s positions counted (a per-position audit)."""
        return replace(self, mask=self.mask & mask)


def with_kl(pair: PolicyPair, variant: Variant) -> PolicyPair:
    """The pair with its KL settings set to ``variant``'s (the same models)."""
    view = copy.copy(pair)
    view.kl = replace(pair.kl, estimator=variant.estimator, gradient=variant.gradient,
                      is_correction=variant.is_correction, placement=variant.placement)
    return view


def estimated(pair: PolicyPair, variant: Variant, batch: Batch) -> Tensor:
    """f [B] with ∇f = ĝ of one sequence. Loss: Σ_t of training's KL term (through log π_θ).
    Reward: the sampled sequence's penalty Σ_t k_t (the detached number training subtracts
    from the return, from the sampling policy's log-probs) times Σ_t ρ_t, ρ_t = π/π_old per
    token as in the clipped surrogate (unclipped, no baseline): on-policy k·∇log π(y)."""
    view = with_kl(pair, variant)
    mask = batch.mask
    if variant.placement == "loss":
        term = view.kl_loss_term(batch.logp, batch.ref_logp, batch.logits, batch.ref_logits,
                                 batch.old_logp)
        return masked_sum(term, mask)
    penalty = masked_sum(view.reward_penalty(batch.old_logp, batch.ref_logp, batch.old_logits,
                                             batch.ref_logits, mask), mask)
    ratio = torch.exp(batch.logp - batch.old_logp)
    return penalty.detach() * masked_sum(ratio, mask)


def _position_kl(batch: Batch, forward: bool) -> Tensor:
    """The exact KL over the vocabulary at each position [B, N], with gradient through π's
    logits: KL(π‖π_ref), or KL(π_ref‖π) when ``forward``."""
    if forward:
        return full_kl(batch.ref_logits, batch.logits)
    return full_kl(batch.logits, batch.ref_logits)


def importance(batch: Batch) -> Tensor:
    """π(y)/π_old(y) of each sequence [B], detached: the targets are expectations under the
    current π, the draws come from π_old (1 on-policy)."""
    return torch.exp(masked_sum(batch.logp - batch.old_logp, batch.mask)).detach()


def myopic_target(batch: Batch, forward: bool = False) -> Tensor:
    """f [B] of a per-position target: Σ_t ∇KL_t at each prefix, the prefixes' probability
    held (``reverse_kl_myopic``; ``forward_kl`` with ``forward``, KL(π_ref‖π) per position:
    what k3 in the loss follows on-policy)."""
    return importance(batch) * masked_sum(_position_kl(batch, forward), batch.mask)


def sequence_target(batch: Batch) -> Tensor:
    """f [B] whose expected gradient is ∇KL(π‖π_ref) of the whole sequence: the myopic part
    plus each token's score times the exact KL of the positions after it (Rao–Blackwellised:
    E[Σ_t KL_t] differentiated through the prefixes' probabilities too)."""
    per_position = _position_kl(batch, forward=False) * batch.mask
    later = sum_after(per_position)  # Σ_{s>t} KL_s
    score = masked_sum(batch.logp * later.detach(), batch.mask)
    return importance(batch) * (per_position.sum(1) + score)


def target(name: str, batch: Batch) -> Tensor:
    """f [B] of the target ``name`` on sampled sequences."""
    if name == "reverse_kl":
        return sequence_target(batch)
    return myopic_target(batch, forward=name == "forward_kl")


class MeanGradients:
    """∇θ of the weighted sum Σ_y w_y·f_y of per-sequence functions on one scored batch, by
    two backwards: f's gradient with respect to the policy's logits (cheap), then the
    network's backward from those logits. Functions whose logit gradients agree (k3 with
    ``is_correction`` and k2, say) share the network's backward, the audit's main cost."""

    def __init__(self, batch: Batch, weights: Tensor, params: list[Tensor]) -> None:
        self.batch, self.weights, self.params = batch, weights, params
        self._seen: list[tuple[Tensor, Tensor]] = []

    def __call__(self, f: Tensor) -> Tensor:
        total = (f.double() * self.weights).sum()
        (upstream,) = torch.autograd.grad(total, self.batch.logits, retain_graph=True,
                                          allow_unused=True)
        if upstream is None:
            upstream = torch.zeros_like(self.batch.logits)
        scale = float(upstream.abs().max())
        for seen, grad in self._seen:
            if torch.allclose(seen, upstream, rtol=1e-5, atol=1e-7 * scale):
                return grad
        grad = flat_grad(self.batch.logits, self.params, upstream)
        self._seen.append((upstream, grad))
        return grad


def flat_grad(value: Tensor, params: list[Tensor], upstream: Tensor | None = None) -> Tensor:
    """∇θ value as one flat float64 vector (zeros for parameters it does not reach)."""
    grads = torch.autograd.grad(value, params, grad_outputs=upstream, retain_graph=True,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                      for g, p in zip(grads, params, strict=True)])
