"""The metrics reference, generated from ``klsweep.metrics``, the registry every step's row and
summary.json are checked against before they are written."""

from __future__ import annotations

from klsweep.metrics import METRICS, SUMMARY, Metric
from klsweep.site.tables import WIDE, cell, named, table

# what each prefix of the step metrics holds, in the order the page shows them
PREFIXES = {
    "step": "The row's step",
    "kl": "The KL and β",
    "reward": "Reward",
    "policy": "The policy",
    "loss": "Losses",
    "value": "PPO's critic",
    "dpo": "DPO",
    "rollout": "The rollout engine",
    "perf": "Speed",
    "dist": "Data parallel",
    "exact": "The exact task",
}


def _prefix(metric: Metric) -> str:
    return metric.name.partition("/")[0]


def _step_rows(metrics: list[Metric]) -> list[list[str]]:
    return [[named(m.name), cell(m.unit), cell(m.meaning), cell(m.when),
             f"`{m.summary_name}` ({m.final})" if m.summary_name else "–"] for m in metrics]


def metrics_page() -> str:
    """The whole page, as Markdown."""
    lines = [*WIDE, "# Metrics reference", "",
             "Generated from `klsweep/metrics.py`, the registry a run logs through: every "
             "step's row (`metrics.jsonl` and the W&B history, the same keys) and "
             "`summary.json` are checked against it before they are written, and a name it "
             "does not declare stops the run. A name with `{…}` is a family: the braces stand "
             "for one part of the name. Units: `nats/token` is a mean over completion tokens, "
             "`nats/sequence` a sum over each completion, averaged; `reward` is in the task "
             "reward's units; `kl.unit` follows that option.", ""]
    grouped: dict[str, list[Metric]] = {}
    for metric in METRICS.values():
        grouped.setdefault(_prefix(metric), []).append(metric)
    order = [*PREFIXES, *sorted(set(grouped) - set(PREFIXES))]
    lines += ["## Every step", "",
              "Keys of each row of `metrics.jsonl` and of the W&B history; the last column "
              "names the `summary.json` key that keeps the run's final value of it.", ""]
    for prefix in order:
        if prefix in grouped:
            title = PREFIXES.get(prefix, f"`{prefix}/*`")
            lines += [f"### {title} {{#{prefix}}}", "",
                      *table(("name", "unit", "meaning", "logged", "in summary.json"),
                             _step_rows(grouped[prefix]))]
    lines += ["## summary.json {#summary}", "",
              "Besides the final values above, a run's `summary.json` (and its W&B run's "
              "summary) holds:", "",
              *table(("key", "unit", "meaning"),
                     [[named(m.name, f"summary-{m.name}"), cell(m.unit), cell(m.meaning)]
                      for m in SUMMARY.values()])]
    return "\n".join(lines) + "\n"
