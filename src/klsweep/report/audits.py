"""The KL-gradient audits beside the runs: every ``python -m klsweep.audit`` run dir under the
report's PATHs (one holding ``audit.json``) has its full table and figure copied into the
report's folder, a compact table in report.md (rel_bias of each way of forming the KL term
against each target) and its rows in one W&B table. The report reads the audit's files only;
it does not import the audit (a command above it)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klsweep.kl import forms
from klsweep.report.runs import dirs_holding

RECORD = "audit.json"
KEYS = ("estimator", "placement", "gradient", "is_correction")


@dataclass(frozen=True)
class Audit:
    path: Path
    result: dict[str, Any]
    name: str  # the stem its files take in the report's folder

    @property
    def title(self) -> str:
        r = self.result
        return (f"task={r['task']} algo={r['algo']}, {r['method'].replace('_', ' ')}, "
                f"{r['train_steps']} updates, staleness {r['staleness']}")


def find_audits(paths: Iterable[str]) -> list[Audit]:
    """Every dir holding audit.json, at or below each PATH (globs expanded), in path order;
    named ``audit`` when there is one, ``audit-1``, ``audit-2``, ... when there are more."""
    dirs = dirs_holding(paths, RECORD)
    return [Audit(d, json.loads((d / RECORD).read_text()),
                  "audit" if len(dirs) == 1 else f"audit-{i}") for i, d in enumerate(dirs, 1)]


def copy_into(audits: Sequence[Audit], out: Path) -> dict[str, str]:
    """Copy each audit's table and figure into ``out``; return the figures ({title: file})."""
    figures = {}
    for audit in audits:
        for suffix in (".md", ".png"):
            source, target = audit.path / f"audit{suffix}", out / f"{audit.name}{suffix}"
            if source.is_file() and source.resolve() != target.resolve():
                shutil.copyfile(source, target)
        if (out / f"{audit.name}.png").is_file():
            figures[f"KL-gradient audit ({audit.title})"] = f"{audit.name}.png"
    return figures


def _way(row: dict[str, Any]) -> str:
    return (f"{row['estimator']} in the {row['placement']}"
            + (", ∇ of k2" if row["gradient"] == "k2" else "")
            + (", sequence-IS-corrected" if row["is_correction"] == "sequence"
               else ", IS-corrected" if row["is_correction"] else ""))


def markdown_lines(audits: Sequence[Audit]) -> list[str]:
    """A section per audit: rel_bias = |E ĝ − g*|/|g*| of each way of forming the KL term
    against each target (the unit does not change it), and where the full table is."""
    lines = ["## KL-gradient audit", ""]
    for audit in audits:
        rows = [r for r in audit.result["rows"] if r["unit"] == "token"]
        targets = list(dict.fromkeys(r["target"] for r in rows))
        ways: dict[tuple, dict[str, float]] = {}
        for r in rows:
            ways.setdefault(tuple(r[k] for k in KEYS), {"way": _way(r)})[r["target"]] = \
                r["rel_bias"]
        lines += [f"### {audit.title}", "",
                  f"rel_bias of the expected gradient against each target (0: follows it "
                  f"exactly); variance, cosine and mse_at_batch in [{audit.name}.md]"
                  f"({audit.name}.md), from `{audit.path}`.", "",
                  "| way of forming the KL term | " + " | ".join(targets) + " |",
                  "|---|" + "---|" * len(targets)]
        lines += ["| " + way["way"] + " | " + " | ".join(f"{way[t]:.3g}" for t in targets)
                  + " |" for way in ways.values()]
        lines.append("")
    return lines


def wandb_table(audits: Sequence[Audit]) -> tuple[list[str], list[list[Any]]]:
    """Every audit's rows, with the audit's dir and staleness, as (columns, rows)."""
    columns = ["audit", "staleness", *audits[0].result["rows"][0]]
    return columns, [[str(a.path), a.result["staleness"],
                      *{**row, "is_correction": forms.spelled(row["is_correction"])}.values()]
                     for a in audits for row in a.result["rows"]]
