"""The report's section on RL with verifiable rewards (runs that logged ``eval/*``,
task=reasoning): what RL and its KL do to pass@k and entropy, against the reference.

* ``pass_at_k.png``: pass@k against k (log axis) at each group's last evaluation, mean ± std
  over seeds, with the reference's (``eval/ref_pass@k`` of the first step) as the baseline;
  Yue et al. (2025) read RL-trained models so: RL above the reference at k = 1 and below it
  at large k means it narrowed what the model samples.
* ``accuracy_vs_kl.png``: the last evaluation's accuracy against the run's final KL.
* ``entropy.png``: the held-out entropy at each evaluation, and the training batch's.
* a table: pass@1, pass@(largest k), entropy and KL per group, with its seeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from klsweep.report.runs import Group
from klsweep.tracking import mean_std

FIGURES = {"pass@k against k: RL groups and their reference": "pass_at_k.png",
           "Held-out accuracy against final KL": "accuracy_vs_kl.png",
           "Entropy over the steps": "entropy.png"}
_PASS = re.compile(r"^eval/pass@(\d+)$")


@dataclass
class RLVRGroup:
    """A group of runs that differ only by seed, read for pass@k: each run's last
    evaluation and its reference's (step 0)."""

    group: Group
    last: list[dict[str, float]]       # per run: the last row with eval/accuracy
    reference: list[dict[str, float]]  # per run: the row with eval/ref_accuracy

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def ks(self) -> list[int]:
        return sorted({int(m.group(1)) for row in self.last for key in row
                       if (m := _PASS.match(key))})

    def stat(self, key: str, reference: bool = False) -> tuple[float, float, int]:
        rows = self.reference if reference else self.last
        return mean_std(row.get(key, math.nan) for row in rows)


def rlvr_groups(groups: Sequence[Group]) -> list[RLVRGroup]:
    """The groups whose runs evaluated on held-out questions, ordered by β."""
    found = []
    for group in groups:
        last = [_last(run.rows, "eval/accuracy") for run in group.runs]
        reference = [_last(run.rows, "eval/ref_accuracy") for run in group.runs]
        if any(last):
            found.append(RLVRGroup(group, [r for r in last if r], [r for r in reference if r]))
    return sorted(found, key=lambda g: (g.group.panel, _beta(g), g.label))


def _last(rows: Sequence[dict[str, float]], key: str) -> dict[str, float]:
    return next((row for row in reversed(rows) if key in row), {})


def _beta(group: RLVRGroup) -> float:
    return float(group.group.runs[0].get("kl.beta", math.nan))


def _fmt(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stat
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def markdown_lines(groups: Sequence[RLVRGroup]) -> list[str]:
    """The section: one table per panel, the reference's row first."""
    lines = ["## pass@k against the reference (held-out evaluation)", "",
             "At each group's last evaluation, mean ± std over seeds: pass@1 (the accuracy), "
             "pass@k at the largest k evaluated, the held-out entropy (nats/token) and the "
             "final KL (last-quarter mean of `kl/mean`). The reference row is the first "
             "step's evaluation of the reference model (the same for every run here). pass@k "
             "is the unbiased estimate of the expected best score of k samples (Chen et al. "
             "2021's for 0/1 scores; a partial score counts as its value).", ""]
    for panel in dict.fromkeys(g.group.panel for g in groups):
        members = [g for g in groups if g.group.panel == panel]
        k_max = max(max(g.ks) for g in members)
        references = [row for g in members for row in g.reference]
        ref = RLVRGroup(members[0].group, [], references)
        lines += [f"### {panel}", "",
                  f"| group | seeds | pass@1 | pass@{k_max} | entropy | KL |",
                  "|---|---|---|---|---|---|",
                  f"| reference | {len(references)} runs | "
                  f"{_fmt(ref.stat('eval/ref_pass@1', True))} | "
                  f"{_fmt(ref.stat(f'eval/ref_pass@{k_max}', True))} | "
                  f"{_fmt(ref.stat('eval/ref_entropy', True))} | 0 |"]
        for g in members:
            kl = mean_std(run.record.get("kl_final", math.nan) for run in g.group.runs)
            lines.append(f"| {g.label} | {len(g.last)} | {_fmt(g.stat('eval/pass@1'))} | "
                         f"{_fmt(g.stat(f'eval/pass@{k_max}'))} | "
                         f"{_fmt(g.stat('eval/entropy'))} | {_fmt(kl, 4)} |")
        lines.append("")
    return lines


def draw(groups: Sequence[RLVRGroup], out: Path) -> dict[str, str]:
    """The three figures into ``out``; returns {title: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    plot_pass_at_k(groups, out / FIGURES["pass@k against k: RL groups and their reference"])
    plot_accuracy_vs_kl(groups, out / "accuracy_vs_kl.png")
    plot_entropy(groups, out / "entropy.png")
    return dict(FIGURES)


def _colours(n: int) -> list[Any]:
    import matplotlib.pyplot as plt

    return list(plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(n, 1))))


def _panels(groups: Sequence[RLVRGroup]):
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(g.group.panel for g in groups))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 2.6, 4.4),
                             squeeze=False, layout="constrained")
    return fig, [(panel, axes[0, i], [g for g in groups if g.group.panel == panel])
                 for i, panel in enumerate(panels)]


def _finish(fig: Any, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    handles, labels = {}, []
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="outside right center",
               fontsize=8.5, frameon=False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass_at_k(groups: Sequence[RLVRGroup], path: Path) -> None:
    fig, panels = _panels(groups)
    for panel, ax, members in panels:
        ks = sorted({k for g in members for k in g.ks})
        ref = RLVRGroup(members[0].group, [], [row for g in members for row in g.reference])
        ref_stats = [ref.stat(f"eval/ref_pass@{k}", True) for k in ks]
        ax.errorbar(ks, [s[0] for s in ref_stats], yerr=[s[1] for s in ref_stats],
                    color="black", linestyle="--", marker="o", capsize=3, label="reference")
        for g, colour in zip(members, _colours(len(members)), strict=True):
            stats = [g.stat(f"eval/pass@{k}") for k in ks]
            ax.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colour,
                        marker="o", capsize=3, label=g.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(xlabel="k (samples per question)", ylabel="pass@k (held-out)", title=panel)
        ax.grid(alpha=0.3)
    n_seeds = sorted({len(g.last) for g in groups})
    _finish(fig, f"pass@k at the last evaluation, mean ± std over "
                 f"{'–'.join(map(str, n_seeds))} seeds", path)


def plot_accuracy_vs_kl(groups: Sequence[RLVRGroup], path: Path) -> None:
    fig, panels = _panels(groups)
    for panel, ax, members in panels:
        ref = RLVRGroup(members[0].group, [], [row for g in members for row in g.reference])
        mean, std, _ = ref.stat("eval/ref_accuracy", True)
        ax.axhline(mean, color="black", linestyle="--", label="reference")
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
        for g, colour in zip(members, _colours(len(members)), strict=True):
            kls = [run.record.get("kl_final", math.nan) for run in g.group.runs]
            accuracy = [row.get("eval/accuracy", math.nan) for row in g.last]
            ax.scatter(kls, accuracy, color=colour, s=18, alpha=0.5)
            ax.errorbar([np.nanmean(kls)], [np.nanmean(accuracy)],
                        xerr=[np.nanstd(kls)], yerr=[np.nanstd(accuracy)], color=colour,
                        marker="s", capsize=3, label=g.label)
        ax.set(xlabel="final KL to the reference (kl/mean, last quarter)",
               ylabel="held-out accuracy (pass@1)", title=panel)
        ax.grid(alpha=0.3)
    _finish(fig, "Held-out accuracy against KL: each run (dots) and its group's mean", path)


def plot_entropy(groups: Sequence[RLVRGroup], path: Path) -> None:
    fig, panels = _panels(groups)
    for panel, ax, members in panels:
        ref = RLVRGroup(members[0].group, [], [row for g in members for row in g.reference])
        ax.axhline(ref.stat("eval/ref_entropy", True)[0], color="black", linestyle="--",
                   label="reference")
        for g, colour in zip(members, _colours(len(members)), strict=True):
            for i, run in enumerate(g.group.runs):
                rows = [row for row in run.rows if "eval/entropy" in row]
                ax.plot([row["step"] + 1 for row in rows], [row["eval/entropy"] for row in rows],
                        color=colour, marker="o", markersize=3,
                        label=g.label if i == 0 else None)
                train = [row for row in run.rows if "policy/entropy" in row]
                ax.plot([row["step"] + 1 for row in train],
                        [row["policy/entropy"] for row in train], color=colour, alpha=0.15,
                        linewidth=0.8)
        ax.set(xlabel="update", ylabel="entropy (nats/token)", title=panel)
        ax.grid(alpha=0.3)
    _finish(fig, "Held-out entropy at each evaluation (markers) and the training batch's "
                 "(faint), every seed", path)
