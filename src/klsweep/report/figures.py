"""The report's figures (matplotlib, Agg backend): KL and β trajectories, final reward
against final KL with the Pareto front (and the exact task's closed-form frontier; each
divergence's own in report.frontiers), and the tracking metrics per group. One colour per
schedule, one panel per (algorithm, task), seeds as thin lines around their mean."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from klsweep.kl.schedules import SCHEDULES  # noqa: E402
from klsweep.report.frontiers import plot_divergence_frontiers  # noqa: E402
from klsweep.tracking import SMOOTHING_WINDOW, trailing_mean  # noqa: E402

# Colours follow the schedule registry's order, so a schedule has the same colour in every
# report; line styles tell apart groups of one schedule that differ in another value.
# tab10 without its grey, which the reference curves (frontier, Pareto front) use.
_PALETTE = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
_LINESTYLES = ("-", "--", ":", "-.")
_MAX_LEGEND = 16
DPI = 110


def schedule_colour(name: str) -> tuple[float, float, float]:
    order = list(SCHEDULES)
    index = order.index(name) if name in order else len(order) + sum(map(ord, name))
    return _PALETTE[index % len(_PALETTE)]


def _styles(groups: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """Colour, line style and legend label of each group (by id), per panel. Past
    ``_MAX_LEGEND`` groups (an Optuna study over a continuous β) the legend names only the
    schedules; report.md and runs.csv still tell the groups apart."""
    styles: dict[int, dict[str, Any]] = {}
    seen: dict[tuple[str, str], int] = {}
    by_schedule = len(groups) > _MAX_LEGEND
    for g in groups:
        n = seen.get((g.panel, g.schedule), 0)
        seen[(g.panel, g.schedule)] = n + 1
        styles[id(g)] = {"color": schedule_colour(g.schedule),
                         "linestyle": "-" if by_schedule else _LINESTYLES[n % len(_LINESTYLES)],
                         "label": g.schedule if by_schedule else g.label}
    return styles


def _panels(groups: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(g.panel for g in groups))


def _subplots(n_panels: int, width: float = 6.2, height: float = 4.4):
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels + 2.4, height),
                             squeeze=False, layout="constrained")
    return fig, axes


def _series(run: Any, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in run.rows if key in row and row[key] is not None]
    return (np.asarray([row.get("step", i) for i, row in enumerate(rows)], dtype=float),
            np.asarray([row[key] for row in rows], dtype=float))


def _mean_over_seeds(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean at each step over the seeds that reached it (a failed seed stops early)."""
    by_step: dict[float, list[float]] = {}
    for steps, values in series:
        for s, v in zip(steps, values, strict=True):
            by_step.setdefault(float(s), []).append(float(v))
    steps = np.asarray(sorted(by_step))
    return steps, np.asarray([np.mean(by_step[s]) for s in steps])


def _symlog(ax: Any, axis: str, values: Sequence[float], floor: float) -> None:
    """Log scale for positive values, linear within ``floor`` of 0 (KL starts at exactly 0,
    k1 can be negative, a decayed β reaches 0)."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return
    if all(v > 0 for v in values if math.isfinite(v)):  # nothing at or below 0: plain log
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return
    linthresh = max(min(floor, max(finite)), 1e-12)
    kwargs = {"linthresh": linthresh, "linscale": 0.4}
    (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", **kwargs)
    if min(v for v in values if math.isfinite(v)) >= 0:  # no empty negative half
        if axis == "y":
            ax.set_ylim(bottom=0)
        else:
            ax.set_xlim(left=0)


def figure_legend(fig: Any, axes: Any) -> None:
    """One legend beside the figure for every label its panels drew, each label once."""
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles[label], labels[label] = h, label
    fig.legend(list(handles.values()), list(labels), loc="outside right center", fontsize=8.5,
               frameon=False)


def _n_seeds(groups: Sequence[Any]) -> str:
    counts = sorted({len(g.runs) for g in groups})
    return f"{counts[0]} seed{'s' if counts[0] > 1 else ''}" if len(counts) == 1 else \
        f"{counts[0]}–{counts[-1]} seeds"


def plot_trajectories(groups: Sequence[Any], path: Path, *, key: Callable[[Any], str],
                      ylabel: str, title: str, floor: Callable[[list[Any]], float],
                      show_target: bool, smooth: int = 1) -> None:
    """One panel per (algorithm, task): each group's seeds as thin lines, their mean thick."""
    panels = _panels(groups)
    styles = _styles(groups)
    fig, axes = _subplots(len(panels))
    for ax, panel in zip(axes[0], panels, strict=True):
        members = [g for g in groups if g.panel == panel]
        values: list[float] = []
        for g in members:
            series = [_series(run, key(run)) for run in g.runs]
            style = styles[id(g)]
            for steps, ys in series:
                ax.plot(steps, ys, lw=0.6, alpha=0.35, color=style["color"])
                values += list(ys)
            steps, mean = _mean_over_seeds(series)
            ax.plot(steps, trailing_mean(mean, smooth), lw=1.8, label=style["label"],
                    **{k: v for k, v in style.items() if k != "label"})
        runs = [run for g in members for run in g.runs]
        if show_target:  # where a schedule steered toward it
            for target in sorted({run.target for run in runs if run.tracks_target}):
                ax.axhspan(0.8 * target, 1.2 * target, color="0.5", alpha=0.15, lw=0,
                           label="target ± 20%")
                ax.axhline(target, color="black", ls="--", lw=1.1, label="target KL")
        _symlog(ax, "y", values, floor(runs))
        ax.set_title(panel)
        ax.set_xlabel("training step (policy update)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="major")
    fig.suptitle(f"{title}\n{_n_seeds(groups)} per group: thin lines = one seed each, "
                 f"thick line = their mean"
                 + (f" as a {smooth}-step trailing mean" if smooth > 1 else ""), fontsize=11)
    figure_legend(fig, axes)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _kl_label(runs: Sequence[Any]) -> str:
    estimators = sorted({run.estimator for run in runs})
    unit = "nats/sequence" if {run.unit for run in runs} == {"sequence"} else "nats/token"
    return f"KL(π‖π_ref), {'/'.join(estimators)} estimate [{unit}]"


def pareto_front(kl: Sequence[float], reward: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point beats on both: lower KL and higher reward, by KL."""
    order = np.argsort(np.asarray(kl, dtype=float), kind="stable")
    front_kl, front_reward, best = [], [], -math.inf
    for i in order:
        if reward[i] > best:
            best = reward[i]
            front_kl.append(kl[i])
            front_reward.append(reward[i])
    return np.asarray(front_kl, dtype=float), np.asarray(front_reward, dtype=float)


def exact_frontier(exact: dict[str, Any], completion_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The closed-form reward–KL frontier of the exact task from a run's exact.json: π_β*
    ∝ π_ref·exp(r/β) over the grid of 1/β, KL per token (sequence KL / completion_len)."""
    from klsweep.exact_math import tilted_curve

    ref_logp = np.asarray([p["ref_logp"] for p in exact["prompts"]], dtype=np.float64)
    reward = np.asarray([p["reward"] for p in exact["prompts"]], dtype=np.float64)
    kl, (mean_reward,) = tilted_curve(ref_logp, reward, [reward])
    return kl / completion_len, mean_reward


def exact_best_of_n(exact: dict[str, Any], completion_len: int,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, KL per token, mean reward) of the exact best-of-n policies over π_ref, n = 1, 2,
    4, …, 64, from a run's exact.json (its reward: the one the policy optimised)."""
    from klsweep.exact_math import BEST_OF_N, best_of_n_curve

    ref_logp = np.asarray([p["ref_logp"] for p in exact["prompts"]], dtype=np.float64)
    reward = np.asarray([p["reward"] for p in exact["prompts"]], dtype=np.float64)
    ns, kl, mean_reward = best_of_n_curve(ref_logp, reward, BEST_OF_N)
    return ns, kl / completion_len, mean_reward


def _one_reward(records: Sequence[dict[str, Any]]) -> bool:
    """Whether the exact.json ``records`` all hold the same reward table."""
    tables = [[p["reward"] for p in record["prompts"]] for record in records]
    return all(table == tables[0] for table in tables[1:])


def plot_reward_vs_kl(groups: Sequence[Any], path: Path) -> None:
    """Final reward against final KL: runs as dots, groups as mean ± std crosses, the
    empirical Pareto front, the target, and for the exact task the closed-form frontier
    and, beside it, best-of-n over π_ref (the baseline that needs no training)."""
    panels = _panels(groups)
    styles = _styles(groups)
    fig, axes = _subplots(len(panels))
    for ax, panel in zip(axes[0], panels, strict=True):
        members = [g for g in groups if g.panel == panel]
        runs = [run for g in members for run in g.runs]
        exact = all("exact_kl" in run.record for run in runs)
        kl_col, reward_col = ("exact_kl", "exact_reward") if exact else ("kl_final", "reward_final")
        xs, ys = [], []
        for g in members:
            style = styles[id(g)]
            gx = [run.record[kl_col] for run in g.runs]
            gy = [run.record[reward_col] for run in g.runs]
            ax.scatter(gx, gy, s=14, alpha=0.45, color=style["color"], lw=0)
            ax.errorbar(np.nanmean(gx), np.nanmean(gy),
                        xerr=np.nanstd(gx, ddof=1) if len(gx) > 1 else None,
                        yerr=np.nanstd(gy, ddof=1) if len(gy) > 1 else None,
                        marker="D", ms=6, mec="black", mew=0.6, capsize=2, lw=1.2,
                        label=style["label"],
                        **{k: v for k, v in style.items() if k != "label"})
            done = [i for i, run in enumerate(g.runs) if run.record["status"] == "completed"]
            xs += [gx[i] for i in done]
            ys += [gy[i] for i in done]
        finite = [(x, y) for x, y in zip(xs, ys, strict=True)
                  if math.isfinite(x) and math.isfinite(y)]
        if finite:
            fx, fy = pareto_front(*map(list, zip(*finite, strict=True)))
            ax.step(fx, fy, where="post", color="black", lw=1.0, alpha=0.8,
                    label="empirical Pareto front (completed runs)")
        # an exact run that failed before its end has no exact.json; runs that optimised
        # different rewards (proxies) share no frontier
        source = next((run for run in runs if run.exact), None) if exact else None
        if source is not None and _one_reward([run.exact for run in runs if run.exact]):
            curve_kl, curve_reward = exact_frontier(
                source.exact, int(source.get("task.completion_len", 1)))
            ax.plot(curve_kl, curve_reward, color="0.25", lw=2.2, alpha=0.6, zorder=0,
                    label="closed-form frontier π*_β ∝ π_ref·exp(r/β)")
            ns, bon_kl, bon_reward = exact_best_of_n(
                source.exact, int(source.get("task.completion_len", 1)))
            # n = 1 is π_ref itself, at KL 0: off a log axis, and the frontier's start
            ax.plot(bon_kl[1:], bon_reward[1:], "s--", color="0.45", ms=4, lw=1.0, zorder=1,
                    label="best-of-n over π_ref, n = 2, 4, …, 64 (exact)")
            for n, x, y in zip(ns, bon_kl, bon_reward, strict=True):
                if n in (2, 8, 64):
                    ax.annotate(f"n={n}", (x, y), xytext=(3, -10), textcoords="offset points",
                                fontsize=7.5, color="0.35")
        for target in sorted({run.target for run in runs
                              if run.unit == "token" and run.tracks_target}):
            ax.axvline(target, color="black", ls="--", lw=1.0, label="target KL")
        _symlog(ax, "x", xs + [run.target for run in runs], min(r.target for r in runs) / 5)
        ax.set_title(panel)
        which = "exact, last evaluation" if exact else "mean of the last quarter of steps"
        ax.set_xlabel(f"final KL(π‖π_ref) [nats/token] ({which})")
        ax.set_ylabel(f"final reward ({which})")
        ax.grid(alpha=0.3)
    fig.suptitle("What each β schedule buys: final reward against final KL\n"
                 "dots = one seed each, diamonds = mean ± std over seeds", fontsize=11)
    figure_legend(fig, axes)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# (metric, axis label, log scale, reference line and its meaning)
_TRACKING_PANELS = (
    ("steps_to_target", "steps until KL stays within ±20%\n(× = never settled)", False, None),
    ("overshoot", "overshoot: max KL / target (log)\n(dotted: 1.2, the top of the ±20% band)",
     True, 1.2),
    ("tracking_error", "tracking error: mean |KL − target| / target\n(second half, log; "
     "dotted: 0.2)", True, 0.2),
    ("beta_volatility", "β volatility: std of Δβ / mean β\n(0 = constant or straight-line β)",
     False, None),
)


def plot_tracking(groups: Sequence[Any], path: Path) -> None:
    """Per group, each tracking metric as mean ± std over seeds (diamond and bar) with the
    seeds as dots; groups sorted best-tracking first. One row per (algorithm, task)."""
    panels = _panels(groups)
    styles = _styles(groups)
    n_max = max(sum(g.panel == p for g in groups) for p in panels)
    fig, axes = plt.subplots(len(panels), len(_TRACKING_PANELS),
                             figsize=(3.7 * len(_TRACKING_PANELS) + 1.3,
                                      max(2.8, 1.0 + 0.34 * n_max) * len(panels) + 0.7),
                             squeeze=False, layout="constrained")
    for row, panel in zip(axes, panels, strict=True):
        members = [g for g in groups if g.panel == panel]
        ypos = np.arange(len(members))[::-1]
        for ax, (metric, label, log, reference) in zip(row, _TRACKING_PANELS, strict=True):
            for y, g in zip(ypos, members, strict=True):
                mean, std, n = g.stats[metric]
                values = [run.record[metric] for run in g.runs]
                finite = [v for v in values if math.isfinite(v)]
                if n:
                    ax.errorbar(mean, y, xerr=std if n > 1 else None, marker="D", ms=7,
                                mec="black", mew=0.6, capsize=3, lw=1.2,
                                color=styles[id(g)]["color"])
                ax.scatter(finite, [y] * len(finite), s=12, color="black", zorder=3)
                never = [run.record["steps_done"]
                         for run, v in zip(g.runs, values, strict=True) if not math.isfinite(v)]
                if metric == "steps_to_target" and never:
                    ax.scatter(never, [y] * len(never), marker="x", s=36, color="crimson",
                               zorder=3)
            if reference is not None:
                ax.axvline(reference, color="black", ls=":", lw=1.0)
            if log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
                ax.set_xlim(left=0)
            ax.set_ylim(-0.6, len(members) - 0.4)
            ax.set_yticks(ypos, [g.label for g in members] if ax is row[0] else [])
            ax.set_xlabel(label, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].set_title(panel, loc="left", fontsize=10)
    fig.suptitle(f"How well each β schedule tracked the target KL\n{_n_seeds(groups)} per "
                 f"group: diamond = mean ± std, dots = one seed each; best tracking error on "
                 f"top", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def draw_all(groups: Sequence[Any], out: Path) -> dict[str, str]:
    """Write every figure into ``out``; return {title: file name} in the report's order."""
    out = Path(out)
    plot_trajectories(
        groups, out / "kl_trajectories.png", key=lambda run: run.kl_key,
        ylabel=_kl_label([r for g in groups for r in g.runs]),
        title="KL to the reference per step, β schedules compared",
        floor=lambda runs: min(r.target for r in runs) / 5, show_target=True,
        smooth=SMOOTHING_WINDOW)
    plot_trajectories(
        groups, out / "beta_trajectories.png", key=lambda run: "kl/beta",
        ylabel="β (KL coefficient)", title="β per step, β schedules compared",
        floor=lambda runs: min(float(r.get("kl.beta", 1.0)) or 1.0 for r in runs) / 10,
        show_target=False)
    plot_reward_vs_kl(groups, out / "reward_vs_kl.png")
    figures = {"KL trajectories": "kl_trajectories.png",
               "β trajectories": "beta_trajectories.png",
               "Final reward against final KL": "reward_vs_kl.png"}
    if any(g.tracks_target for g in groups):  # else no schedule had a target to track
        plot_tracking(groups, out / "tracking.png")
        figures["Tracking metrics per schedule"] = "tracking.png"
    if plot_divergence_frontiers([run for g in groups for run in g.runs],
                                 out / "divergence_frontiers.png", _PALETTE, DPI):
        figures["Each divergence's frontier: reward against it and against the reverse KL"] = \
            "divergence_frontiers.png"
    return figures
