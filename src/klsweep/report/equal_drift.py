"""Schedules compared at equal drift: the reward each run had when its KL first reached common
levels, instead of its final reward at whatever KL it drifted to.

A run's trajectory is its (KL, reward) per step, each as a trailing mean over ``window`` steps
(the report's smoothing, ``klsweep.tracking``), KL in the unit of ``kl.target``. Its reward at a
level k is read where the smoothed KL first reaches k, linearly interpolated between the two
steps that bracket the crossing; a run whose KL never reaches k has none there. The levels are
the budget (``--budget``, else the runs' common ``kl.target``) and ``N_LEVELS`` evenly spaced up
to the smallest final KL of the runs compared, which every run has reached.

Seeds separate two schedules at a level when every seed of the better one is above every seed
of the other and that is unlikely by chance: under the null that the schedules do not differ
all orderings of the pooled values are equally likely, so the ordering happens by chance with
probability 1 / C(n_a + n_b, n_a) (one-sided), and separation is claimed only where that is at
most ``ALPHA``. This chance depends on the seed counts alone: one seed against one is 0.5
whatever the rewards, 3 against 3 is 0.05, the fewest equal counts that can reach ALPHA; where
fewer seeds ran, the report says how many it would take. With so few seeds no test can say
more; a t test would add a normality assumption nobody can check on three values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from klsweep.report.runs import Group, Run
from klsweep.tracking import SMOOTHING_WINDOW, mean_std, trailing_mean

N_LEVELS = 4  # grid levels up to the smallest final KL, besides the budget
ALPHA = 0.05  # the largest chance at which seeds are said to separate two groups
FIGURE = "equal_drift.png"
TABLE = "equal_drift.md"
COLUMNS = ["panel", "group", "kl", "reward_mean", "reward_std", "seeds"]  # of rows()


def reward_at_kl(kl: Sequence[float], reward: Sequence[float],
                 levels: Sequence[float]) -> np.ndarray:
    """The reward where the trajectory's KL first reaches each level, linearly interpolated
    between the two points that bracket the crossing; NaN for a level it never reaches."""
    kl, reward = np.asarray(kl, dtype=float), np.asarray(reward, dtype=float)
    out = np.full(len(levels), math.nan)
    for j, level in enumerate(levels):
        reached = np.flatnonzero(kl >= level)
        if len(reached) == 0:
            continue
        i = reached[0]
        if i == 0:
            out[j] = reward[0]
            continue
        share = (level - kl[i - 1]) / (kl[i] - kl[i - 1])  # kl[i-1] < level <= kl[i]
        out[j] = reward[i - 1] + share * (reward[i] - reward[i - 1])
    return out


def trajectory(run: Run, window: int = SMOOTHING_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """A run's smoothed (KL, reward) at the steps that logged both."""
    rows = [row for row in run.rows if run.kl_key in row and "reward/mean" in row]
    kl = [row[run.kl_key] for row in rows]
    reward = [row["reward/mean"] for row in rows]
    if not rows:
        return np.asarray([]), np.asarray([])
    return trailing_mean(kl, window), trailing_mean(reward, window)


def kl_levels(runs: Sequence[Run], budget: float | None,
              n_levels: int = N_LEVELS) -> list[float]:
    """``n_levels`` evenly spaced up to the smallest final KL among ``runs``, and the budget."""
    finals = [run.record.get("kl_final", math.nan) for run in runs]
    smallest = min((k for k in finals if math.isfinite(k) and k > 0), default=math.nan)
    levels = [smallest * (i + 1) / n_levels for i in range(n_levels)] \
        if math.isfinite(smallest) else []
    if budget is not None and math.isfinite(budget):
        levels.append(budget)
    return sorted(set(levels))


def separated(better: Sequence[float], worse: Sequence[float]) -> tuple[bool, float]:
    """Whether every value of ``better`` is above every value of ``worse``, and the chance of
    that ordering when the two do not differ (exact, one-sided)."""
    better = [v for v in better if math.isfinite(v)]
    worse = [v for v in worse if math.isfinite(v)]
    if not better or not worse:
        return False, math.nan
    return min(better) > max(worse), 1.0 / math.comb(len(better) + len(worse), len(better))


def seeds_to_separate(n_better: int, n_worse: int, alpha: float = ALPHA) -> tuple[int, int]:
    """The fewest seeds per group, at least those that ran, at which the ordering test can
    reach ``alpha``: the smallest total with 1 / C(a + b, a) <= alpha, the more even split
    first (3 and 3 for 0.05 from one seed each)."""
    total = n_better + n_worse
    while True:
        splits = [(a, total - a) for a in range(n_better, total - n_worse + 1)
                  if 1 / math.comb(total, a) <= alpha]
        if splits:
            return min(splits, key=lambda split: abs(split[0] - split[1]))
        total += 1


def seed_counts(a: int, b: int) -> str:
    return f"{a} seed{'s' if a > 1 else ''} each" if a == b else f"{a} and {b} seeds"


def verdict(better: Sequence[float], worse: Sequence[float], other: str) -> str:
    """Whether seeds separate the leader from ``other`` at chance <= ALPHA; where too few
    seeds ran for the test to reach it whatever the rewards, how many it would take."""
    apart, chance = separated(better, worse)
    if apart and chance <= ALPHA:
        return f"seeds separate it from {other} (chance {chance:.2g})"
    if math.isnan(chance) or chance <= ALPHA:  # enough seeds ran: their rewards overlap
        return f"seeds do not separate it from {other}"
    ran = [sum(math.isfinite(v) for v in values) for values in (better, worse)]
    seen = (f"its seeds all lie above those of {other}" if apart
            else f"seeds do not separate it from {other}")
    return (f"{seen}, but with {seed_counts(*ran)} the test cannot tell: that ordering has "
            f"chance {chance:.2g} when the two do not differ, and reaching {ALPHA:g} takes "
            f"{seed_counts(*seeds_to_separate(*ran))}")


class PanelComparison:
    """One panel's groups at its levels: each run's reward, and the groups' statistics."""

    def __init__(self, panel: str, groups: Sequence[Group], budget: float | None,
                 window: int = SMOOTHING_WINDOW) -> None:
        self.panel, self.groups, self.window = panel, list(groups), window
        runs = [run for g in self.groups for run in g.runs]
        if budget is None:  # the target KL, where the runs' schedules steered toward one
            targets = {run.target for run in runs if run.tracks_target}
            budget = targets.pop() if len(targets) == 1 else None
        self.budget = budget
        self.levels = kl_levels(runs, budget)
        self.rewards = {id(g): np.asarray([reward_at_kl(*trajectory(r, window), self.levels)
                                           for r in g.runs]).reshape(len(g.runs), -1)
                        for g in self.groups}

    def stats(self, group: Group, j: int) -> tuple[float, float, int]:
        return mean_std(self.rewards[id(group)][:, j])

    def leader_sentence(self, j: int) -> str:
        """The best group at level ``j``, and whether its seeds separate it from the next."""
        ranked = sorted((g for g in self.groups if self.stats(g, j)[2]),
                        key=lambda g: -self.stats(g, j)[0])
        if len(ranked) < 2:
            return "fewer than two schedules reached it"
        first, second = ranked[:2]
        return (f"{first.label} leads; " + verdict(self.rewards[id(first)][:, j],
                                                  self.rewards[id(second)][:, j], second.label))

    def table(self) -> list[str]:
        header = [f"{k:.3g}" + (" (budget)" if k == self.budget else "") for k in self.levels]
        lines = [f"| group | seeds | {' | '.join(header)} |",
                 "|---|---|" + "---|" * len(self.levels)]
        for g in self.groups:
            cells = []
            for j in range(len(self.levels)):
                mean, std, n = self.stats(g, j)
                shown = f"{mean:.3f} ± {std:.3f}" if n else "—"
                cells.append(shown + (f" ({n} of {len(g.runs)})" if 0 < n < len(g.runs) else ""))
            lines.append(f"| {g.label} | {len(g.runs)} | {' | '.join(cells)} |")
        return lines

    def rows(self) -> list[list]:
        """The table as W&B rows (``COLUMNS``): the seeds are those that reached the level."""
        return [[self.panel, g.label, level, *self.stats(g, j)]
                for g in self.groups for j, level in enumerate(self.levels)]


def compare(groups: Sequence[Group], budget: float | None = None,
            window: int = SMOOTHING_WINDOW) -> list[PanelComparison]:
    """A comparison for each panel with at least two groups that logged a trajectory."""
    panels: dict[str, list[Group]] = {}
    for g in groups:
        if any(len(trajectory(r, window)[0]) for r in g.runs):
            panels.setdefault(g.panel, []).append(g)
    return [PanelComparison(panel, members, budget, window)
            for panel, members in panels.items() if len(members) > 1]


def markdown_lines(comparisons: Sequence[PanelComparison]) -> list[str]:
    """The section of report.md (and the whole of equal_drift.md)."""
    if not comparisons:
        return []
    lines = ["## Reward at equal drift", "",
             "Reward (`reward/mean`) where each run's KL first reached each level, mean ± std "
             "over seeds; the levels are the budget and an even grid up to the smallest final "
             f"KL of the runs compared, which every run reached. KL and reward are "
             f"{comparisons[0].window}-step trailing means, interpolated linearly between the "
             "two steps around the crossing. Seeds *separate* two groups when every seed of "
             "one is above every seed of the other and the chance of that ordering when they "
             f"do not differ, 1/C(n₁+n₂, n₁), is at most {ALPHA:g}: it is 0.5 for one seed "
             f"each, and {seed_counts(*seeds_to_separate(1, 1))} are the fewest that reach "
             f"{ALPHA:g}.", ""]
    for c in comparisons:
        lines += [f"### {c.panel}", "", *c.table(), ""]
        lines += [f"* KL {k:.3g}: {c.leader_sentence(j)}" for j, k in enumerate(c.levels)]
        lines.append("")
    return lines


def plot_equal_drift(comparisons: Sequence[PanelComparison], path: Path,
                     n_points: int = 40) -> None:
    """Mean reward over seeds against KL, one line per group (± std shaded) up to the KL all
    its seeds reached, the budget marked; one panel per (task, algorithm)."""
    from klsweep.report.figures import DPI, figure_legend, plt, schedule_colour

    fig, axes = plt.subplots(1, len(comparisons), figsize=(6.2 * len(comparisons) + 2.4, 4.4),
                             squeeze=False, layout="constrained")
    for ax, c in zip(axes[0], comparisons, strict=True):
        for g in c.groups:
            paths = [trajectory(r, c.window) for r in g.runs]
            reach = min((float(kl.max()) for kl, _ in paths if len(kl)), default=math.nan)
            if not math.isfinite(reach) or reach <= 0:
                continue
            grid = np.linspace(reach / n_points, reach, n_points)
            values = np.asarray([reward_at_kl(kl, reward, grid) for kl, reward in paths])
            mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) \
                if len(values) > 1 else np.zeros(n_points)
            colour = schedule_colour(g.schedule)
            ax.plot(grid, mean, color=colour, label=g.label)
            ax.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
        if c.budget is not None:
            ax.axvline(c.budget, color="0.3", linestyle="--", lw=1, label=f"budget {c.budget:g}")
        unit = "nats/token" if c.groups[0].runs[0].unit == "token" else "nats/sequence"
        ax.set(xlabel=f"KL to the reference ({unit}, {c.window}-step mean)",
               ylabel="reward when the KL first reached it", title=c.panel)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
