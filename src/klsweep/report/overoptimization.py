"""Over-optimisation (Gao, Schulman & Hilton 2022): runs that optimised a proxy reward
(``task.reward_source=proxy``), their gold and proxy reward against d = √KL, and Gao et al.'s
fitted form for RL, R(d) = d·(α − β·log d), whose peak says at which KL to stop.

Runs are grouped by the proxy they optimised (``task.proxy.pairs``, within one panel of
algorithm and task); a group's runs differ by β or schedule. Every logged point of every run
of the group goes into one fit: a run with a fixed β traces the curve as its KL grows, and the
runs' last points show where each β stops. Rewards are gains over the reference (R(0) = 0 in
Gao et al.'s form), KL is per sequence: the exact task's ``exact/*`` at each evaluation (its
reference reward exact, from exact.json), else the sampled ``kl/seq`` with ``reward/gold`` and
``reward/proxy`` as trailing means (the first step, sampled before any update, gives the
reference reward).

α and β here are Gao et al.'s coefficients, not the KL coefficient β of the runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from klsweep.records import final_mean  # noqa: E402
from klsweep.report.figures import figure_legend  # noqa: E402
from klsweep.tracking import SMOOTHING_WINDOW, trailing_mean  # noqa: E402

FIGURE = "overoptimization.png"
DPI = 110


# --- the fit -----------------------------------------------------------------------------------
def gao_curve(d: Any, alpha: float, beta: float) -> np.ndarray:
    """R(d) = d·(α − β·log d), 0 at d = 0 (its limit)."""
    d = np.asarray(d, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(d)), 0.0)


def fit_gao(kl: Sequence[float], gain: Sequence[float]) -> tuple[float, float]:
    """Least-squares (α, β) of R(d) = d·(α − β·log d), d = √KL, on points (KL, reward gain
    over the reference). The form is linear in (α, β), with features d and −d·log d; points
    at KL ≤ 0 (where every curve of the form is 0) carry no information and are dropped.
    NaNs where fewer than two distinct positive KLs are left."""
    kl, gain = np.asarray(kl, dtype=float), np.asarray(gain, dtype=float)
    keep = np.isfinite(kl) & np.isfinite(gain) & (kl > 0)
    d = np.sqrt(kl[keep])
    if len(np.unique(d)) < 2:
        return math.nan, math.nan
    features = np.stack([d, -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(features, gain[keep], rcond=None)
    return float(alpha), float(beta)


def gao_peak(alpha: float, beta: float) -> tuple[float, float]:
    """(d*, R(d*)): where R(d) = d·(α − β·log d) peaks and its value there.

    R'(d) = α − β·log d − β is 0 at log d* = α/β − 1, and R''(d) = −β/d < 0 for β > 0, so
    d* = exp(α/β − 1) is the maximum, with R(d*) = d*·(α − (α − β)) = β·d*; the KL at the
    peak is d*² = exp(2α/β − 2). For β ≤ 0 the curve never turns down: (inf, inf) when it
    rises (α > 0), else no gain at all: (0, 0)."""
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        return math.nan, math.nan
    if beta <= 0:
        return (math.inf, math.inf) if alpha > 0 else (0.0, 0.0)
    d_star = math.exp(min(alpha / beta - 1.0, 700.0))  # past e^700 the float is inf anyway
    return d_star, beta * d_star


# --- the runs ----------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """One proxy run's points: KL per sequence, gold and proxy reward gains over the
    reference, and where it stopped (its final KL)."""

    label: str
    order: tuple[float, str]  # how runs are listed: by β, then label
    kl: np.ndarray
    gold: np.ndarray
    proxy: np.ndarray
    final_kl: float
    final_gold: float


@dataclass
class ProxyGroup:
    """The runs that optimised one proxy (one ``task.proxy.pairs``), and the fit to them."""

    panel: str
    pairs: int
    trajectories: list[Trajectory]
    exact_curve: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    alpha: float = math.nan
    beta: float = math.nan
    d_star: float = math.nan
    peak_gain: float = math.nan
    closest: Trajectory | None = field(default=None)

    @property
    def kl_star(self) -> float:
        return self.d_star**2

    @property
    def max_kl(self) -> float:
        return max((float(np.nanmax(t.kl)) for t in self.trajectories if len(t.kl)),
                   default=math.nan)


def _tables(exact: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log π_ref, proxy reward, gold reward) [X, Y] of a proxy run's exact.json."""
    return tuple(np.asarray([p[key] for p in exact["prompts"]], dtype=float)
                 for key in ("ref_logp", "reward", "gold_reward"))


def _reference_rewards(run: Any) -> tuple[float, float] | None:
    """The reference's exact gold and proxy reward, from a proxy run's exact.json."""
    from klsweep.exact_math import expected_reward

    if not run.exact or "gold_reward" not in run.exact["prompts"][0]:
        return None
    ref, proxy, gold = _tables(run.exact)
    return float(expected_reward(ref, gold).mean()), float(expected_reward(ref, proxy).mean())


def trajectory(run: Any) -> Trajectory | None:
    """A proxy run's points, exact where it has ``exact/gold_reward``, else sampled; None for
    a run that logged no gold reward."""
    label = str(run.record.get("group") or run.name)
    beta = run.get("kl.beta")
    order = (float(beta) if isinstance(beta, (int, float)) else math.inf, label)
    exact_rows = [r for r in run.rows if "exact/gold_reward" in r]
    reference = _reference_rewards(run)
    if exact_rows:
        # drift from the initial model: with a moving reference, exact/kl is to the current one
        kl = np.asarray([r.get("exact/kl_to_init", r["exact/kl"]) for r in exact_rows],
                        dtype=float)
        gold = np.asarray([r["exact/gold_reward"] for r in exact_rows], dtype=float)
        proxy = np.asarray([r["exact/proxy_reward"] for r in exact_rows], dtype=float)
        final_kl, final_gold = float(kl[-1]), float(gold[-1])
        if reference is not None:  # the reference itself is a point of the curve: KL 0
            kl, gold, proxy = (np.concatenate([[start], a]) for start, a in
                               zip((0.0, *reference), (kl, gold, proxy), strict=True))
        gold0, proxy0 = gold[0], proxy[0]
        return Trajectory(label, order, kl, gold - gold0, proxy - proxy0, final_kl,
                          final_gold - gold0)
    rows = [r for r in run.rows if "reward/gold" in r and "kl/seq" in r]
    if not rows:
        return None
    gold_raw = [r["reward/gold"] for r in rows]
    proxy_raw = [r["reward/proxy"] for r in rows]
    kl = np.maximum(trailing_mean([r["kl/seq"] for r in rows], SMOOTHING_WINDOW), 0.0)
    gold = trailing_mean(gold_raw, SMOOTHING_WINDOW) - gold_raw[0]
    proxy = trailing_mean(proxy_raw, SMOOTHING_WINDOW) - proxy_raw[0]
    final_kl = max(final_mean(rows, "kl/seq"), 0.0)
    return Trajectory(label, order, kl, gold, proxy, final_kl, final_mean(rows, "reward/gold")
                      - gold_raw[0])


def exact_proxy_optimum(exact: dict[str, Any], n_points: int = 80,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL per sequence, gold and proxy reward gains of π*_β ∝ π_ref·exp(r_proxy/β) over a
    log grid of 1/β: what a perfect optimiser of the proxy objective reaches, from exact.json
    alone (the exact task with the proxy)."""
    from klsweep.exact_math import expected_reward, sequence_kl, tilted_logp

    ref, proxy, gold = _tables(exact)
    points = []
    for inverse_beta in [0.0, *np.logspace(-2, 3, n_points), math.inf]:
        logp = tilted_logp(ref, proxy, float(inverse_beta))
        points.append((float(sequence_kl(logp, ref).mean()),
                       float(expected_reward(logp, gold).mean()),
                       float(expected_reward(logp, proxy).mean())))
    kl, gold_mean, proxy_mean = map(np.asarray, zip(*points, strict=True))
    return kl, gold_mean - gold_mean[0], proxy_mean - proxy_mean[0]


def proxy_groups(runs: Sequence[Any]) -> list[ProxyGroup]:
    """The proxy runs grouped by (panel, ``task.proxy.pairs``), each group fitted, and the
    run whose final √KL is nearest the fitted peak's d* named. Empty without proxy runs."""
    groups: dict[tuple[str, int], ProxyGroup] = {}
    for run in runs:
        if run.get("task.reward_source") != "proxy":
            continue
        traj = trajectory(run)
        if traj is None:
            continue
        pairs = int(run.get("task.proxy.pairs", 0))
        panel = f"{run.algo} · {run.task}"
        group = groups.setdefault((panel, pairs), ProxyGroup(panel, pairs, []))
        group.trajectories.append(traj)
        if group.exact_curve is None and _reference_rewards(run) is not None:
            group.exact_curve = exact_proxy_optimum(run.exact)
    for group in groups.values():
        group.trajectories.sort(key=lambda t: t.order)
        kl = np.concatenate([t.kl for t in group.trajectories])
        gold = np.concatenate([t.gold for t in group.trajectories])
        group.alpha, group.beta = fit_gao(kl, gold)
        group.d_star, group.peak_gain = gao_peak(group.alpha, group.beta)
        if math.isfinite(group.d_star):  # beyond every run's KL: the one that went farthest
            group.closest = min(group.trajectories,
                                key=lambda t: abs(math.sqrt(t.final_kl) - group.d_star))
    return sorted(groups.values(), key=lambda g: (g.panel, g.pairs))


# --- what the report shows ---------------------------------------------------------------------
def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else ("∞" if value > 0 else "–")


def peak_label(group: ProxyGroup) -> str:
    """The fitted peak as a panel title states it: KL* only where it lies inside the measured
    KL range; past it the fit is an extrapolation (KL* = 2.7e+05 from runs that reached 20),
    so the title says how far the data goes instead."""
    if group.kl_star <= group.max_kl:
        return f"KL* = {_fmt(group.kl_star)} nats/sequence"
    return f"rising through KL = {_fmt(group.max_kl)} nats/sequence"


def verdict(group: ProxyGroup, bold: bool = True) -> str:
    """One sentence: the fitted form, the peak and the run that stopped nearest it (its
    label in markdown bold unless ``bold`` is false)."""
    head = (f"{group.panel}, task.proxy.pairs={group.pairs}: α = {_fmt(group.alpha)}, "
            f"β = {_fmt(group.beta)}")
    if math.isnan(group.d_star):
        return head + "; too few points to fit."
    best = group.closest
    name = "" if best is None else (f"**{best.label}**" if bold else best.label)
    if not group.kl_star <= group.max_kl:
        text = (f"{head}; the fitted gold reward still rises at the largest KL reached "
                f"({_fmt(group.max_kl)} nats/sequence): no peak within it")
        if best is not None:
            text += (f"; {name} ended farthest out, at KL {_fmt(best.final_kl)} with gold gain "
                     f"{_fmt(best.final_gold)}")
        return text + "."
    text = (f"{head}; gold reward peaks at KL* = {_fmt(group.kl_star)} nats/sequence "
            f"(√KL = {_fmt(group.d_star)}), {_fmt(group.peak_gain)} above the reference")
    if best is not None:
        text += (f"; {name} stopped nearest it, at KL {_fmt(best.final_kl)} with gold gain "
                 f"{_fmt(best.final_gold)}")
    return text + "."


def markdown_lines(groups: Sequence[ProxyGroup]) -> list[str]:
    """report.md's over-optimisation section: the fit per group and the runs' end points."""
    lines = ["## Over-optimisation: gold against proxy reward", "",
             "Runs that optimised a proxy reward model (`task.reward_source=proxy`), grouped by "
             "the proxy's training pairs. Gold reward gain over the reference against "
             "d = √KL (KL per sequence), fitted with Gao et al.'s R(d) = d·(α − β·log d) on "
             "every logged point of the group's runs; it peaks at d* = exp(α/β − 1). "
             "(α, β: Gao et al.'s coefficients, not the KL coefficient.)", ""]
    lines += [f"* {verdict(g)}" for g in groups]
    lines += ["", "| group | pairs | run | final KL (nats/seq) | final gold gain | "
              "final proxy gain | peak of the fit |", "|---|---|---|---|---|---|---|"]
    for g in groups:
        for t in g.trajectories:
            lines.append(f"| {g.panel} | {g.pairs} | {t.label} | {_fmt(t.final_kl)} | "
                         f"{_fmt(t.final_gold)} | {_fmt(float(t.proxy[-1]))} | "
                         f"{peak_label(g)} |")
    return lines + [""]


def plot_overoptimization(groups: Sequence[ProxyGroup], path: Path) -> None:
    """One column per group: above, each run's gold reward gain against √KL with the fitted
    curve and its peak; below, the proxy reward gain (the two have different scales). On the
    exact task both rows also show the exact optimum of the proxy objective, π*_β ∝
    π_ref·exp(r_proxy/β) over all β: what a perfect optimiser of the proxy reaches."""
    fig, axes = plt.subplots(2, len(groups), figsize=(5.4 * len(groups) + 2.8, 7.6),
                             squeeze=False, sharex="col", layout="constrained")
    cmap = plt.get_cmap("viridis")
    for column, group in enumerate(groups):
        gold_ax, proxy_ax = axes[0, column], axes[1, column]
        n = len(group.trajectories)
        top = max(float(np.nanmax(np.sqrt(t.kl))) for t in group.trajectories)
        for i, t in enumerate(group.trajectories):
            style = {"color": cmap(0.9 * i / max(n - 1, 1)), "ms": 3.5, "lw": 1.2,
                     "label": t.label}
            d = np.sqrt(np.maximum(t.kl, 0.0))
            gold_ax.plot(d, t.gold, "o-", **style)
            proxy_ax.plot(d, t.proxy, "x-", **style)
        if group.exact_curve is not None:
            kl, gold, proxy = group.exact_curve
            keep = np.sqrt(kl) <= 1.15 * top
            exact = {"color": "0.3", "lw": 2.0, "alpha": 0.5, "zorder": 0,
                     "label": "exact optimum of the proxy objective, π*_β ∝ "
                              "π_ref·exp(r_proxy/β), over β"}
            gold_ax.plot(np.sqrt(kl[keep]), gold[keep], **exact)
            proxy_ax.plot(np.sqrt(kl[keep]), proxy[keep], **exact)
        if math.isfinite(group.alpha):
            grid = np.linspace(0.0, top, 200)
            gold_ax.plot(grid, gao_curve(grid, group.alpha, group.beta), color="crimson",
                         lw=2.0, label="least-squares fit d·(α − β·log d) to the gold points")
            if math.isfinite(group.d_star) and group.d_star <= top:
                gold_ax.axvline(group.d_star, color="crimson", ls=":", lw=1.2,
                                label="its peak d* = exp(α/β − 1)")
        gold_ax.set_title(f"{group.panel} · task.proxy.pairs={group.pairs}\n"
                          f"α = {_fmt(group.alpha)}, β = {_fmt(group.beta)}, "
                          f"{peak_label(group)}", fontsize=10)
        gold_ax.set_ylabel("gold reward gain over the reference")
        proxy_ax.set_ylabel("proxy reward gain over the reference")
        proxy_ax.set_xlabel("d = √KL(π‖π_ref) [√nats per sequence]")
        for ax in (gold_ax, proxy_ax):
            ax.axhline(0.0, color="black", lw=0.6)
            ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    fig.suptitle("Over-optimisation: what optimising a proxy reward buys in gold reward as "
                 "KL grows\none line per run, one point per evaluation", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
