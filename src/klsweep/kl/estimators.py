"""Per-token estimators of KL(π‖π_ref) on tokens sampled from π (Schulman, "Approximating KL
divergence", 2020). Callers mask and average; every function keeps the shape of ``logp``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# verl clamps the log-ratio at ±20 before k2/k3: exp(20) is finite in every float type we use,
# and k3 overflow is the most reported KL failure (TRL #3015, verl #891).
DEFAULT_CLAMP = 20.0


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: Tensor) -> Tensor:
    # exp(-l) - 1 + l, written with expm1 so that it stays accurate for small |l|.
    return torch.expm1(-log_ratio) + log_ratio


def _abs(log_ratio: Tensor) -> Tensor:
    return log_ratio.abs()


# The estimators on the sampled tokens' log-ratio; ``full`` (over the vocabulary) is the
# one more. A new estimator is one function here, one YAML in conf/estimator/, one test.
_SAMPLED: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3, "abs": _abs}
ESTIMATORS: tuple[str, ...] = (*_SAMPLED, "full")


# Elements of full-vocabulary temporaries per chunk of rows: 2**26 float32 are 256 MiB, a
# batch of rows at a 150k vocabulary instead of the whole [B, N, V] at once
VOCAB_CHUNK_ELEMENTS = 2**26


def by_row_chunks(fn: Callable[..., Tensor], *tensors: Tensor, rows: int | None = None) -> Tensor:
    """``fn`` over chunks of ``rows`` rows of ``tensors`` (None: as many as fit in
    ``VOCAB_CHUNK_ELEMENTS`` elements of the first), concatenated: a function that takes a
    full-vocabulary log-softmax of each row gives each row the numbers of one call on the
    whole tensor, without a [B, N, V] temporary for every position at once."""
    rows = rows or max(1, VOCAB_CHUNK_ELEMENTS // max(1, tensors[0][0].numel()))
    return torch.cat([fn(*parts) for parts in zip(*(t.split(rows) for t in tensors),
                                                   strict=True)])


def full_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(π‖π_ref) over the vocabulary, from logits [..., vocab] -> [...], a chunk of
    rows at a time."""
    def kl(rows: Tensor, ref_rows: Tensor) -> Tensor:
        logp_all = torch.log_softmax(rows.float(), dim=-1)
        ref_logp_all = torch.log_softmax(ref_rows.float(), dim=-1)
        return (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1).to(rows.dtype)

    return by_row_chunks(kl, logits, ref_logits)


def kl_per_token(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: str,
    *,
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    clamp: float | None = DEFAULT_CLAMP,
) -> Tensor:
    """Per-token KL(π‖π_ref) estimate on tokens sampled from π (Schulman's k1/k2/k3).

    ``logp`` and ``ref_logp`` are the log-probabilities of the sampled tokens under π and π_ref.
    With ``l = logp - ref_logp``: k1 = l, k2 = l²/2, k3 = exp(-l) - 1 + l, abs = |l|; ``full``
    sums over the vocabulary and needs ``logits`` and ``ref_logits`` ([..., vocab]). The
    log-ratio is clamped to ±``clamp`` before k2 and k3 (None: no clamp), so that the result
    is finite for any finite inputs.
    """
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError("estimator 'full' needs logits and ref_logits")
        return full_kl(logits, ref_logits)
    if estimator not in _SAMPLED:
        raise ValueError(f"unknown KL estimator {estimator!r} (allowed: {', '.join(ESTIMATORS)})")
    log_ratio = logp - ref_logp
    if clamp is not None and estimator in ("k2", "k3"):
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return _SAMPLED[estimator](log_ratio)


def kl_penalty_per_token(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: str,
    *,
    gradient: str = "estimator",
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    clamp: float | None = DEFAULT_CLAMP,
) -> Tensor:
    """The KL term placed in a loss: the chosen estimator's value, and with
    ``gradient="k2"`` the gradient of k2 instead (straight-through, verl's ``k3+``): on
    on-policy samples k2's gradient is the reverse-KL gradient at that token, while k1's
    expected gradient is zero and k3's follows the forward KL."""
    value = kl_per_token(logp, ref_logp, estimator, logits=logits, ref_logits=ref_logits,
                         clamp=clamp)
    if gradient == "estimator":
        return value
    if gradient != "k2":
        raise ValueError(f"unknown KL gradient {gradient!r} (allowed: estimator, k2)")
    k2 = kl_per_token(logp, ref_logp, "k2", clamp=clamp)
    return value.detach() + k2 - k2.detach()


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true (over all elements, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_sum(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    return (values * mask.to(values.dtype)).sum(dim)


@torch.no_grad()
def kl_estimates(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: str,
    *,
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    clamp: float | None = DEFAULT_CLAMP,
) -> dict[str, Tensor]:
    """Every estimator's values per token [B, N] from one batch (``full`` when logits are
    given), the configured ``estimator``'s among them."""
    names = [*_SAMPLED] + (["full"] if logits is not None else [])
    if estimator not in names:
        names.append(estimator)
    return {name: kl_per_token(logp, ref_logp, name, logits=logits, ref_logits=ref_logits,
                               clamp=clamp) for name in names}


@torch.no_grad()
def kl_metrics(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    estimator: str,
    *,
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    clamp: float | None = DEFAULT_CLAMP,
    estimates: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """The KL numbers every step logs, from one batch: ``kl/k1 kl/k2 kl/k3 kl/abs`` (and
    ``kl/full`` when logits are given) as means per token, ``kl/mean`` for the configured
    estimator and ``kl/seq``, its sum per sequence averaged over sequences. ``estimates``:
    the batch's ``kl_estimates``, where the caller holds them already."""
    if estimates is None:
        estimates = kl_estimates(logp, ref_logp, estimator, logits=logits,
                                 ref_logits=ref_logits, clamp=clamp)
    out = {f"kl/{name}": masked_mean(values, mask).item() for name, values in estimates.items()}
    chosen = estimates[estimator]
    out["kl/mean"] = masked_mean(chosen, mask).item()
    out["kl/seq"] = masked_sum(chosen, mask).mean().item()
    return out
