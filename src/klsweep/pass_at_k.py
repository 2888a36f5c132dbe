"""pass@k: how likely a problem is solved by at least one of k samples (Chen et al. 2021).

From n samples of a problem with scores s_1..s_n in [0, 1], ``pass_at_k`` estimates, without
bias, the expected best score of k samples drawn from the policy:

    E[max(s_1..s_k)] ≈ Σ_i s_(i) · C(i − 1, k − 1) / C(n, k)

with s_(1) ≤ … ≤ s_(n) the sorted scores: each k-subset of the n samples is an equally likely
draw of k, and s_(i) is its best score in C(i − 1, k − 1) of the C(n, k) subsets. For 0/1
scores with c correct this is Chen et al.'s 1 − C(n − c, k)/C(n, k). A partial score (a
reasoning-gym answer worth 0.5) therefore counts as its value: half a pass. k = 1 gives the
mean score (``eval/accuracy``).

On a task whose completions can be enumerated the truth is exact: with p the policy's
probability of a top-score completion, pass@k = 1 − (1 − p)^k (``exact_pass_at_k``).

Pure numpy; nothing of klsweep is imported.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray


def subset_weights(n: int, k: int) -> NDArray[np.float64]:
    """w_i = C(i − 1, k − 1)/C(n, k) for i = 1..n: the probability that the i-th smallest of
    n scores is the largest of a uniformly drawn k-subset; in logarithms, since C(n, k)
    overflows a float near n = 1030."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (got k={k}, n={n})")
    log_total = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    weights = np.zeros(n)
    for i in range(k, n + 1):
        weights[i - 1] = math.exp(math.lgamma(i) - math.lgamma(k) - math.lgamma(i - k + 1)
                                  - log_total)
    return weights / weights.sum()  # exact in exact arithmetic; removes rounding drift


def pass_at_k_per_problem(scores: ArrayLike, k: int) -> NDArray[np.float64]:
    """The unbiased pass@k of each problem [P] from its n sample scores [P, n] in [0, 1]."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.sort(scores, axis=1) @ subset_weights(scores.shape[1], k)


def pass_at_k(scores: ArrayLike, k: int) -> float:
    """pass@k over problems: the mean of ``pass_at_k_per_problem``."""
    return float(pass_at_k_per_problem(scores, k).mean())


def exact_pass_at_k(p_top: ArrayLike, k: int) -> float:
    """The exact pass@k of problems whose top-score probability under the policy is
    ``p_top`` [P]: the mean of 1 − (1 − p)^k."""
    p_top = np.clip(np.asarray(p_top, dtype=np.float64), 0.0, 1.0)
    return float((1.0 - (1.0 - p_top) ** k).mean())
