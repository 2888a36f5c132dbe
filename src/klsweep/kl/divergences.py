"""The f-divergences klsweep regularises with, D_f(π‖π_ref) = E_{π_ref}[f(π/π_ref)], as pure
functions of log u = log π − log π_ref (u = π/π_ref): f, its derivative f′ and the inverse
of f′, which gives the regularised optimum π* = π_ref·(f′)⁻¹((r − λ)/β).

The f and f′ are those of Wang et al. 2023 ("Beyond Reverse KL", Table 1), which TRL's DPO
``f_divergence_type`` implements, with Pearson χ² f(u) = (u − 1)² beside them (χPO, Huang et
al. 2024). The α family follows TRL 1.16: f′(u) = (u^{α−1} − 1)/(α − 1), so that α → 1 is the
reverse KL and α → 0 the forward KL (Wang et al. write (1 − u^{−α})/α, α → 0 the reverse KL).
f is fixed up to a term c·(u − 1), which E_{π_ref} maps to zero; we pick f(1) = 0 and the
f′ of the table, so that f′ is what a policy gradient weighs each sample's score with.

Everything takes log u, not u: a sequence's u is a product of per-token ratios and
overflows long before its log does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from klsweep.kl import f_terms, forms
from klsweep.kl.estimators import kl_penalty_per_token, kl_per_token

LOG_2 = math.log(2.0)


class Divergence:
    """One f-divergence. ``f_prime_at_zero`` is lim_{u→0} f′(u) (−inf where the optimum
    never puts zero mass) and ``f_prime_sup`` lim_{u→∞} f′(u): the range of f′, outside
    which (f′)⁻¹ is clipped to 0 (below) or is unbounded (above)."""

    name: str
    f_prime_at_zero: float = -math.inf
    f_prime_sup: float = math.inf

    def f(self, log_u: Tensor) -> Tensor:
        raise NotImplementedError

    def f_prime(self, log_u: Tensor) -> Tensor:
        raise NotImplementedError

    def _inverse(self, t: Tensor) -> Tensor:
        """(f′)⁻¹ on the inside of f′'s range."""
        raise NotImplementedError

    def f_prime_inverse(self, t: Tensor) -> Tensor:
        """u = (f′)⁻¹(t), 0 where t is at or below f′(0) (the KKT condition of π ≥ 0: the
        optimum drops a completion whose reward is too low, as χ² does) and inf at or above
        the supremum of f′ (no finite u reaches it; a bracket for λ stays below it)."""
        inside = (t > self.f_prime_at_zero) & (t < self.f_prime_sup)
        safe = torch.where(inside, t, torch.zeros_like(t) + self._inside_point())
        u = self._inverse(safe)
        u = torch.where(t <= self.f_prime_at_zero, torch.zeros_like(u), u)
        return torch.where(t >= self.f_prime_sup, torch.full_like(u, math.inf), u)

    def _inside_point(self) -> float:
        """A t inside f′'s range (f′(1)), where the masked-out entries are evaluated."""
        return float(self.f_prime(torch.zeros((), dtype=torch.float64)))

    def sampled_value(self, log_u: Tensor) -> Tensor:
        """f(u)/u: on samples from π its mean is D_f, since E_{π_ref}[f(u)] = E_π[f(u)/u]
        (for the reverse KL, the log-ratio: k1)."""
        return self.f(log_u) * torch.exp(-log_u)

    # --- training's interface: one call per use, ``kl`` the KL settings (KLConfig) -------
    def check(self, kl: Any) -> None:
        """Raise ValueError (one line) for KL settings that mean nothing for this divergence:
        its penalty and loss term are fixed by f′ (their gradient must be ∇D_f), so
        ``kl.estimator`` picks only the value estimate (``k1`` f(u)/u, ``k3`` the
        non-negative one, ``full`` exact per position, token unit only); k2, abs,
        ``kl.gradient=k2`` and a loss-placed ``kl.is_correction`` are the reverse KL's own."""
        allowed = ("k1", "k3", "full") if kl.unit == f_terms.TOKEN else ("k1", "k3")
        if kl.estimator not in allowed:
            raise ValueError(f"kl.estimator={kl.estimator} cannot estimate "
                             f"kl.divergence={self.name} at kl.unit={kl.unit} "
                             f"(allowed: {', '.join(allowed)})")
        if kl.gradient != "estimator":
            raise ValueError(f"kl.gradient={kl.gradient} is a reverse-KL option "
                             f"(kl.divergence={self.name} allows: estimator)")
        if kl.is_correction and kl.placement == "loss":  # in the reward it acts on nothing
            raise ValueError(f"kl.is_correction=true is a reverse-KL option of a loss-placed "
                             f"KL (kl.divergence={self.name} needs kl.is_correction=false, "
                             f"or auto)")

    def _terms(self, kl: Any, logits: Tensor | None, ref_logits: Tensor | None) -> dict:
        return {"unit": kl.unit, "estimator": kl.estimator, "logits": logits,
                "ref_logits": ref_logits, "clamp": kl.clamp}

    def values(self, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl: Any,
               logits: Tensor | None = None, ref_logits: Tensor | None = None,
               kl_estimate: Tensor | None = None) -> Tensor:
        """The divergence's estimate per token [B, N] (its masked sum per sequence averages
        to the divergence in kl.unit), without gradient. ``kl_estimate``: the configured
        estimator's reverse KL per token of the same batch, where the caller holds it (the
        KL's own values; the other divergences compute theirs)."""
        with torch.no_grad():
            return f_terms.value_per_token(self, logp, ref_logp, mask,
                                           **self._terms(kl, logits, ref_logits))

    def reward_penalty(self, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl: Any,
                       logits: Tensor | None = None,
                       ref_logits: Tensor | None = None) -> Tensor:
        """The per-token penalty [B, N], detached, that β times leaves the reward."""
        return f_terms.reward_penalty(self, logp, ref_logp, mask,
                                      **self._terms(kl, logits, ref_logits))

    def loss_term(self, logp: Tensor, ref_logp: Tensor, old_logp: Tensor, mask: Tensor,
                  kl: Any, logits: Tensor | None = None,
                  ref_logits: Tensor | None = None) -> Tensor:
        """The per-token term [B, N] of a loss, with its gradient through log π_θ."""
        return f_terms.loss_term(self, logp, ref_logp, mask,
                                 **self._terms(kl, logits, ref_logits))

    def pair_score(self, log_u: Tensor) -> Tensor:
        """f′(u) up to an additive constant, which cancels in the margin f′(u_w) − f′(u_l)
        of an f-DPO pair (Wang et al. 2023); the reverse KL's is log u itself, so that its
        f-DPO is DPO to the bit."""
        return self.f_prime(log_u)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReverseKL(Divergence):
    """KL(π‖π_ref): f(u) = u log u, f′ = log u + 1, π* ∝ π_ref·e^{r/β}."""

    name = "reverse_kl"

    def f(self, log_u: Tensor) -> Tensor:
        return torch.where(torch.isneginf(log_u), torch.zeros_like(log_u),
                           torch.exp(log_u) * log_u)

    def f_prime(self, log_u: Tensor) -> Tensor:
        return log_u + 1.0

    def _inverse(self, t: Tensor) -> Tensor:
        return torch.exp(t - 1.0)

    def sampled_value(self, log_u: Tensor) -> Tensor:
        return log_u

    # The KL keeps klsweep's estimators and options (DESIGN §4): every one means something
    # for it, and its chain rule makes the token and sequence units one divergence. What it
    # refuses, the audit's table (kl.forms) says: a correction that breaks a KL's gradient.
    def check(self, kl: Any) -> None:
        reason = forms.breaking_correction(forms.Form(kl.placement, kl.estimator, kl.gradient,
                                                      bool(kl.is_correction)))
        if reason is not None:
            raise ValueError(reason)

    def values(self, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl: Any,
               logits: Tensor | None = None, ref_logits: Tensor | None = None,
               kl_estimate: Tensor | None = None) -> Tensor:
        if kl_estimate is not None:
            return kl_estimate
        return kl_per_token(logp, ref_logp, kl.estimator, logits=logits,
                            ref_logits=ref_logits, clamp=kl.clamp)

    @torch.no_grad()
    def reward_penalty(self, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl: Any,
                       logits: Tensor | None = None,
                       ref_logits: Tensor | None = None) -> Tensor:
        return kl_per_token(logp, ref_logp, kl.estimator, logits=logits,
                            ref_logits=ref_logits, clamp=kl.clamp)

    def loss_term(self, logp: Tensor, ref_logp: Tensor, old_logp: Tensor, mask: Tensor,
                  kl: Any, logits: Tensor | None = None,
                  ref_logits: Tensor | None = None) -> Tensor:
        term = kl_penalty_per_token(logp, ref_logp, kl.estimator, gradient=kl.gradient,
                                    logits=logits, ref_logits=ref_logits, clamp=kl.clamp)
        if kl.is_correction:
            # the ratio with its gradient (TRL's use_bias_correction_kl, DeepSeek-V3.2):
            # on-policy its value is 1, but ∇(ρ·k) = k·∇log π + ∇k turns k3's forward-KL
            # gradient into the reverse-KL one; a detached ratio would change nothing
            term = term * torch.exp(logp - old_logp)
        return term

    def pair_score(self, log_u: Tensor) -> Tensor:
        return log_u


class ForwardKL(Divergence):
    """KL(π_ref‖π): f(u) = −log u, f′ = −1/u (TRL scores 1 − 1/u, the same up to a
    constant), π*/π_ref = β/(λ − r) with λ > max r."""

    name = "forward_kl"
    f_prime_sup = 0.0

    def f(self, log_u: Tensor) -> Tensor:
        return -log_u

    def f_prime(self, log_u: Tensor) -> Tensor:
        return -torch.exp(-log_u)

    def _inverse(self, t: Tensor) -> Tensor:
        return -1.0 / t


class JensenShannon(Divergence):
    """f(u) = u log u − (1 + u) log((1 + u)/2), f′ = log(2u/(1 + u)) = log 2 + log σ(log u)
    (TRL's form). D_f = KL(π‖m) + KL(π_ref‖m), m the mixture: twice the usual JS."""

    name = "js"
    f_prime_sup = LOG_2

    def f(self, log_u: Tensor) -> Tensor:
        u = torch.exp(log_u)
        # (1 + u) log((1 + u)/2) = (1 + u)(softplus(log u) − log 2); u log u → 0 at u = 0
        u_log_u = torch.where(torch.isneginf(log_u), torch.zeros_like(log_u), u * log_u)
        return u_log_u - (1.0 + u) * (torch.nn.functional.softplus(log_u) - LOG_2)

    def f_prime(self, log_u: Tensor) -> Tensor:
        return LOG_2 + torch.nn.functional.logsigmoid(log_u)

    def _inverse(self, t: Tensor) -> Tensor:
        # 2u/(1 + u) = e^t  ⇔  u = e^t/(2 − e^t)
        return torch.exp(t) / (2.0 - torch.exp(t))


class Alpha(Divergence):
    """TRL's α family: f′(u) = (u^{α−1} − 1)/(α − 1), f(u) = (u^α − αu + α − 1)/(α(α − 1)),
    for α in (0, 1): between the forward KL (α → 0) and the reverse KL (α → 1), the range
    Wang et al. study. f′ ranges over (−inf, 1/(1 − α)), so π* never drops a completion."""

    name = "alpha"

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"the alpha divergence needs alpha in (0, 1) (got {alpha!r}); "
                             f"its limits 0 and 1 are forward_kl and reverse_kl")
        self.alpha = float(alpha)
        self.f_prime_sup = 1.0 / (1.0 - self.alpha)

    def f(self, log_u: Tensor) -> Tensor:
        a = self.alpha
        return (torch.exp(a * log_u) - a * torch.exp(log_u) + a - 1.0) / (a * (a - 1.0))

    def f_prime(self, log_u: Tensor) -> Tensor:
        a = self.alpha
        return torch.expm1((a - 1.0) * log_u) / (a - 1.0)

    def _inverse(self, t: Tensor) -> Tensor:
        a = self.alpha
        return torch.exp(torch.log1p((a - 1.0) * t) / (a - 1.0))

    def __repr__(self) -> str:
        return f"Alpha(alpha={self.alpha})"


class ChiSquared(Divergence):
    """Pearson χ²: f(u) = (u − 1)², f′ = 2(u − 1) ≥ −2, π*/π_ref = max(0, 1 + t/2): the
    optimum drops the completions whose reward is more than 2β below λ (χPO)."""

    name = "chi2"
    f_prime_at_zero = -2.0

    def f(self, log_u: Tensor) -> Tensor:
        return torch.expm1(log_u).square()

    def f_prime(self, log_u: Tensor) -> Tensor:
        return 2.0 * torch.expm1(log_u)

    def _inverse(self, t: Tensor) -> Tensor:
        return 1.0 + 0.5 * t


DIVERGENCES: dict[str, type[Divergence]] = {
    cls.name: cls for cls in (ReverseKL, ForwardKL, JensenShannon, Alpha, ChiSquared)}


def make_divergence(name: str, alpha: float | None = None) -> Divergence:
    """The divergence ``name``; ``alpha`` is the α family's parameter and only its."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r} (allowed: {', '.join(DIVERGENCES)})")
    if name == Alpha.name:
        if alpha is None:
            raise ValueError("the alpha divergence needs alpha in (0, 1)")
        return Alpha(alpha)
    return DIVERGENCES[name]()
