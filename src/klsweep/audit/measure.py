"""From gradients to the table's figures: rel_bias = |E ĝ − g*|/|g*|, the cosine between E ĝ
and g* (0 where E ĝ = 0), the variance (trace of the per-sample covariance of ĝ) and
mse_at_batch = (|E ĝ − g*|² + variance/B)/|g*|², the mean squared error of a batch of B
samples' mean gradient relative to |g*|² (so that it reads on rel_bias's scale: rel_bias² plus
the noise of B samples).

The variance and every Monte Carlo figure come from G group means of n draws each: the
per-sample covariance's trace is n·Σ_m |ḡ_m − ḡ|²/(G − 1), and the standard errors are the
jackknife's over the groups (leave one group out)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

# |E ĝ| below this share of |g*| is float32 rounding of a zero expectation (k1 in the loss)
ZERO = 1e-4


@dataclass
class Figures:
    """One row's figures, with their standard errors (0 where exact)."""

    rel_bias: float
    cosine: float
    variance: float
    mse_at_batch: float
    rel_bias_se: float = 0.0
    cosine_se: float = 0.0
    variance_se: float = 0.0
    mse_at_batch_se: float = 0.0


def bias_and_cosine(mean: Tensor, target: Tensor) -> tuple[float, float]:
    """rel_bias and cosine of an expected gradient against a target (both flat)."""
    target_norm = float(target.norm())
    rel_bias = float((mean - target).norm()) / target_norm
    mean_norm = float(mean.norm())
    cosine = 0.0 if mean_norm <= ZERO * target_norm else float(
        mean @ target) / (mean_norm * target_norm)
    return rel_bias, cosine


def group_variance(group_means: Tensor, per_group: int) -> tuple[float, float]:
    """The per-sample covariance's trace from G group means [G, P] of ``per_group`` draws,
    and its standard error (that of a variance from G − 1 degrees of freedom)."""
    G = group_means.shape[0]
    spread = (group_means - group_means.mean(0)).square().sum() / (G - 1)
    variance = float(spread) * per_group
    return variance, variance * (2.0 / (G - 1)) ** 0.5


def mse(rel_bias: float, variance: float, target_norm: float, batch_size: int) -> float:
    return rel_bias ** 2 + variance / batch_size / target_norm ** 2


def exact_figures(mean: Tensor, target: Tensor, group_means: Tensor, per_group: int,
                  batch_size: int) -> Figures:
    """Figures of an enumerated E ĝ and g* (exact), with the variance from draws."""
    rel_bias, cosine = bias_and_cosine(mean, target)
    variance, variance_se = group_variance(group_means, per_group)
    scale = float(target.norm()) ** 2 * batch_size
    return Figures(rel_bias, cosine, variance, mse(rel_bias, variance, float(target.norm()),
                                                  batch_size),
                   variance_se=variance_se, mse_at_batch_se=variance_se / scale)


def _jackknife(values: list[float]) -> float:
    G = len(values)
    mean = sum(values) / G
    return ((G - 1) / G * sum((v - mean) ** 2 for v in values)) ** 0.5


def sampled_figures(group_means: Tensor, group_targets: Tensor, per_group: int,
                    batch_size: int) -> Figures:
    """Figures of G group means of ĝ and of the target [G, P] (Monte Carlo), with jackknife
    standard errors for rel_bias, cosine and mse_at_batch."""
    G = group_means.shape[0]
    total, total_target = group_means.sum(0), group_targets.sum(0)
    rel_bias, cosine = bias_and_cosine(total / G, total_target / G)
    variance, variance_se = group_variance(group_means, per_group)
    loo = [bias_and_cosine((total - group_means[m]) / (G - 1),
                           (total_target - group_targets[m]) / (G - 1)) for m in range(G)]
    target_norm = float(total_target.norm()) / G
    loo_mse = [mse(b, variance, float((total_target - group_targets[m]).norm()) / (G - 1),
                   batch_size) for m, (b, _) in enumerate(loo)]
    return Figures(rel_bias, cosine, variance, mse(rel_bias, variance, target_norm, batch_size),
                   rel_bias_se=_jackknife([b for b, _ in loo]),
                   cosine_se=_jackknife([c for _, c in loo]), variance_se=variance_se,
                   mse_at_batch_se=_jackknife(loo_mse))
