"""Each divergence's closed-form frontier on the exact task, with the runs on it.

For a divergence D_f and unit, the optimum π*_β of max E_π[r] − β·D_f(π‖π_ref) is exact
(klsweep.exact_divergence); over β it traces the divergence's frontier, drawn twice: reward
against D_f itself (the trade-off that divergence buys; its own runs can only sit below it)
and reward against the reverse KL, the one plane on which every divergence's runs and optima
can be compared (the reverse-KL optimum is by construction the top of that plane; the others'
curves say how much reward they give up per nat of KL, and where). Values are per sequence,
as ``exact/divergence`` and ``exact/kl`` are. Each run is drawn at its last evaluation,
joined by a thin line to the optimum of its own β, which is where it should have ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from numpy.typing import NDArray

from klsweep.exact_divergence import divergence, optimum
from klsweep.exact_math import expected_reward, sequence_kl
from klsweep.kl.divergences import Divergence, make_divergence

# β of the frontier, as a multiple of the reward's spread (max − min over completions): from
# nearly the best completion alone (1e-2.5) to nearly π_ref (1e1.5)
_BETA_DECADES = (-2.5, 1.5)
_PANELS_PER_ROW = 3


@dataclass
class Frontier:
    """The optimum π*_β at each β: its mean reward, divergence and reverse KL (per sequence,
    mean over prompts)."""

    beta: NDArray[np.float64]
    reward: NDArray[np.float64]
    divergence: NDArray[np.float64]
    kl: NDArray[np.float64]


def frontier_betas(reward: NDArray[np.float64], n_points: int = 24) -> NDArray[np.float64]:
    """A log grid of β scaled to the reward table's spread (scaling r and β alike leaves π*
    unchanged, so the grid covers the same trade-offs at any reward scale)."""
    spread = float(np.max(reward) - np.min(reward)) or 1.0
    return spread * np.logspace(*_BETA_DECADES, n_points)


def divergence_frontier(div: Divergence, unit: str, ref_logp: NDArray[np.float64],
                        reward: NDArray[np.float64], betas: Sequence[float],
                        vocab_size: int) -> Frontier:
    """The frontier of ``div`` in ``unit`` at each of ``betas``."""
    rewards, divergences, kls = [], [], []
    threads = torch.get_num_threads()
    # one thread, as the runs use (conf threads): on these small tables op overhead
    # dominates, and on a shared machine more threads made the bisection 30 times slower
    torch.set_num_threads(1)
    try:
        for beta in betas:
            logp, _ = optimum(div, unit, ref_logp, reward, float(beta), vocab_size)
            rewards.append(float(expected_reward(logp, reward).mean()))
            divergences.append(float(divergence(div, unit, logp, ref_logp, vocab_size).mean()))
            kls.append(float(sequence_kl(logp, ref_logp).mean()))
    finally:
        torch.set_num_threads(threads)
    return Frontier(np.asarray(betas, dtype=np.float64), np.asarray(rewards),
                    np.asarray(divergences), np.asarray(kls))


@dataclass
class DivergenceRuns:
    """The exact runs regularised by one divergence in one unit."""

    label: str
    divergence: Divergence
    unit: str
    runs: list[Any]


def group_by_divergence(runs: Sequence[Any]) -> list[DivergenceRuns]:
    """Exact runs (with exact.json) by the divergence and unit exact.json names."""
    groups: dict[tuple[str, Any, str], DivergenceRuns] = {}
    for run in runs:
        spec = (run.exact or {}).get("divergence")
        if spec is None:
            continue
        key = (spec["name"], spec.get("alpha"), spec["unit"])
        if key not in groups:
            div = make_divergence(spec["name"], spec.get("alpha"))
            name = f"{spec['name']} α={spec['alpha']:g}" if spec.get("alpha") else spec["name"]
            groups[key] = DivergenceRuns(f"{name} ({spec['unit']})", div, spec["unit"], [])
        groups[key].runs.append(run)
    return list(groups.values())


def _last_exact(run: Any) -> dict[str, float]:
    return [row for row in run.rows if "exact/divergence" in row][-1]


def plot_divergence_frontiers(runs: Sequence[Any], path: Path, colours: Sequence[Any],
                              dpi: int) -> bool:
    """Draw the figure into ``path`` when the exact runs span more than the reverse KL and
    share one reward table; return whether it was drawn."""
    groups = group_by_divergence(runs)
    if not groups or all(g.divergence.name == "reverse_kl" for g in groups):
        return False
    tables = [np.asarray([p["reward"] for p in run.exact["prompts"]])
              for g in groups for run in g.runs]
    if any(table.shape != tables[0].shape or not np.array_equal(table, tables[0])
           for table in tables[1:]):
        return False
    source = groups[0].runs[0]
    ref_logp = np.asarray([p["ref_logp"] for p in source.exact["prompts"]], dtype=np.float64)
    reward, vocab = tables[0].astype(np.float64), int(source.get("task.vocab_size"))
    n_cols = min(_PANELS_PER_ROW, len(groups) + 1)
    n_rows = -(-(len(groups) + 1) // n_cols)
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.9 * n_rows + 0.6),
                             squeeze=False, layout="constrained")
    axes = list(grid.flat)
    for unused in axes[len(groups) + 1:]:
        unused.set_axis_off()
    on_kl = axes[0]
    for g, ax, colour in zip(groups, axes[1:], colours, strict=False):
        curve = divergence_frontier(g.divergence, g.unit, ref_logp, reward,
                                    frontier_betas(reward), vocab)
        on_kl.plot(curve.kl, curve.reward, color=colour, lw=1.8, label=g.label)
        ax.plot(curve.divergence, curve.reward, color=colour, lw=1.8)
        for run in g.runs:
            last, beta = _last_exact(run), float(run.exact["beta_seq"])
            best = divergence_frontier(g.divergence, g.unit, ref_logp, reward, [beta], vocab)
            for axis, x, x_best in ((on_kl, last["exact/kl"], best.kl[0]),
                                    (ax, last["exact/divergence"], best.divergence[0])):
                axis.plot([x, x_best], [last["exact/reward"], best.reward[0]], color=colour,
                          lw=0.7, alpha=0.6)
                axis.scatter([x], [last["exact/reward"]], color=colour, s=22, zorder=3,
                             edgecolor="black", linewidth=0.5)
                axis.scatter([x_best], [best.reward[0]], facecolor="white", edgecolor=colour,
                             s=22, zorder=3)
        ax.set_title(g.label)
        ax.set_xlabel(f"D_f(π‖π_ref), {g.divergence.name} [per {g.unit}]")
    on_kl.set_title("all divergences on the reverse-KL plane")
    on_kl.set_xlabel("KL(π‖π_ref) [nats/sequence]")
    on_kl.legend(fontsize=8)
    for ax in axes[:len(groups) + 1]:
        ax.set_xscale("symlog", linthresh=1e-2)
        ax.set_ylabel("exact reward E_π[r]")
        ax.grid(alpha=0.3)
    fig.suptitle("Each divergence's closed-form frontier (its optimum over β) with its runs:\n"
                 "filled = a run's last evaluation, hollow = the optimum at its β",
                 fontsize=11)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True
