"""DPO's preference losses as pure functions of the chosen and rejected completions'
log-ratios log π(y)/π_ref(y): DPO and its robust, IPO and hinge variants, and f-DPO (Wang et
al. 2023), DPO with an f-divergence D_f(π‖π_ref) in place of the reverse KL.

f-DPO: the optimum of max_π E_π[r] − β·D_f(π‖π_ref) satisfies β·f′(π*(y)/π_ref(y)) = r(y) − λ,
so under Bradley–Terry labels, P(y_w ≻ y_l) = σ(r_w − r_l) = σ(β·[f′(u_w) − f′(u_l)]), and the
likelihood of the labels gives the loss −log σ(β·[f′(u_w) − f′(u_l)]). The reverse KL
(f′ = log u + 1) is DPO. The derivation holds for the losses that are the Bradley–Terry
likelihood: ``sigmoid`` (with cDPO's smoothing, the likelihood of soft labels) and ``robust``
(its unbiased estimate under flipped labels, with the same minimiser). ``ipo`` regresses
onto a preference-probability target that Azar et al. derive for the KL only, ``hinge``
(SLiC) has no regularised optimum at all: neither is an f-DPO loss, and both are refused
with any divergence but the reverse KL (TRL would apply the f′ margin to them regardless).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from klsweep.kl import masked_sum
from klsweep.kl.divergences import Divergence, ReverseKL

LOSSES = ("sigmoid", "robust", "ipo", "hinge")
# the losses that are the Bradley–Terry likelihood, whose f′ margin is f-DPO (Wang et al. 2023)
F_DPO_LOSSES = ("sigmoid", "robust")
REVERSE_KL = ReverseKL()


def _pair_loss(h: Tensor, beta: float, loss_type: str) -> Tensor:
    """ℓ(h), the loss of one pair with its label as given (no smoothing)."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        if beta <= 0:
            raise ValueError(f"the ipo loss needs beta > 0 (got {beta})")
        return (h - 1.0 / (2.0 * beta)).square()
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    raise ValueError(f"unknown DPO loss {loss_type!r} (allowed: {', '.join(LOSSES)})")


def sequence_logratio(logp: Tensor, ref_logp: Tensor, mask: Tensor,
                      per_token: bool = False) -> Tensor:
    """log π(y)/π_ref(y) per completion [B] from the policy's per-token log-probs [B, T]
    over the completion tokens ``mask`` [B, T].

    Summed (default): the sequence log-ratio of DPO's derivation, whose β is then the
    coefficient on sequence KL. ``per_token``: its mean over the completion's tokens, i.e.
    both log-probs divided by the completion's length, as TRL computes them for IPO (its
    comment: the IPO authors confirmed the paper's results use this normalised form); a
    completion without tokens gives 0. ``ref_logp`` is per token [B, T], or already summed
    over ``mask`` [B] (what an offline data set caches)."""
    ref = ref_logp if ref_logp.dim() == logp.dim() - 1 else masked_sum(ref_logp, mask)
    logratio = masked_sum(logp, mask) - ref
    if per_token:
        logratio = logratio / mask.sum(-1).clamp(min=1).to(logratio.dtype)
    return logratio


def check_f_dpo_loss(loss_type: str, divergence: str) -> None:
    """Raises ValueError unless ``loss_type`` is an f-DPO loss of ``divergence`` (a name)."""
    if divergence != REVERSE_KL.name and loss_type not in F_DPO_LOSSES:
        raise ValueError(f"the {loss_type} loss has no f-DPO form: with divergence "
                         f"{divergence!r} use one of {', '.join(F_DPO_LOSSES)} "
                         f"(or divergence reverse_kl)")


def dpo_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             divergence: Divergence = REVERSE_KL) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses [B] from the log-ratios log u = log π(y)/π_ref(y) of the
    chosen and rejected completions (summed or per token: see ``sequence_logratio``), with
    ``h`` the f-DPO margin f′(u_w) − f′(u_l) of ``divergence`` (for the reverse KL, the
    log-ratios' difference: DPO) and ε = ``label_smoothing``:

    * ``sigmoid`` (DPO, Rafailov et al. 2023): ``−log σ(β·h)``;
    * ``robust`` (Chowdhury et al. 2024): ``((1−ε)·ℓ(h) − ε·ℓ(−h))/(1 − 2ε)`` with ℓ the
      sigmoid loss, i.e. TRL's ``(−(1−ε)·log σ(β·h) + ε·log σ(−β·h))/(1 − 2ε)``. When each
      label is flipped with known probability ε, its mean over the flip is the clean ℓ(h),
      so its minimiser is the clean labels' one. Needs 0 ≤ ε < 1/2; for ε > 0 a single pair's
      loss is unbounded below (−∞ as β·h → ∞), only its mean over labels is a proper loss;
    * ``ipo`` (Azar et al. 2023): ``(h − 1/(2β))²``;
    * ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 − β·h)``.

    For ``sigmoid``, ``ipo`` and ``hinge``, ε treats each label as flipped with probability
    ε, ``(1−ε)·ℓ(h) + ε·ℓ(−h)``: for ``sigmoid`` this is conservative DPO (Mitchell 2023; the
    smoothing older TRL applied to ``sigmoid``). That is klsweep's reading, not TRL 1.16's:
    its ``sigmoid`` ignores ``label_smoothing`` (read by ``robust``, ``exo_pair`` and ``aot``
    only), so with ε > 0 the sigmoid loss here is cDPO and TRL's is plain DPO; with ε = 0 the
    f-DPO losses equal TRL 1.16's ``DPOTrainer`` loss to 1e-7 on identical log-probs.
    Returns (losses, chosen rewards, rejected rewards) with the
    implicit rewards ``β·log π/π_ref`` detached (TRL's, whatever the divergence)."""
    check_f_dpo_loss(loss_type, divergence.name)
    h = divergence.pair_score(chosen_logratio) - divergence.pair_score(rejected_logratio)
    eps = label_smoothing
    if loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"the robust loss needs 0 <= label_smoothing < 0.5 (got {eps})")
        # the mean over a flip w.p. ε of this estimator is ℓ(h): (1−ε)²−ε² = 1−2ε cancels
        losses = ((1.0 - eps) * _pair_loss(h, beta, "sigmoid")
                  - eps * _pair_loss(-h, beta, "sigmoid")) / (1.0 - 2.0 * eps)
    else:
        losses = _pair_loss(h, beta, loss_type)
        if eps > 0:
            losses = (1.0 - eps) * losses + eps * _pair_loss(-h, beta, loss_type)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
