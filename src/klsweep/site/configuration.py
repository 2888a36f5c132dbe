"""The configuration reference, generated: every config group and choice, and every option
with its default, what it accepts and its help line, read from the typed dataclasses that
validate a config and feed ``--help`` (``config.node_schemas``' sources), the defaults and
their sources from the YAML files of conf/ that a run composes."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from klsweep.audit.config import AuditConfig
from klsweep.config import (
    CHOICE_NODES,
    CONF_DIR,
    RUN_NODES,
    RunConfig,
    TrainerConfig,
    choice_key,
    config_groups,
    logger_schema,
    schedule_schema,
)
from klsweep.schema import dataclass_type
from klsweep.site.tables import WIDE, allowed, anchor, cell, code, named, prose, table
from klsweep.site.yaml_notes import read_notes

_INTERPOLATION = re.compile(r"^\$\{(\w+)\.(\w+)\}$")
HEADER = ("option", "default", "accepts", "what it sets", "why this default (conf/)")


def _raw(path: Path) -> dict[str, Any]:
    """A YAML file as written: interpolations unresolved, Hydra's defaults list left out."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("defaults", None)
    return node


def _select(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _default(value: Any, conf_dir: Path) -> str:
    """A default as the reader needs it: an interpolation of a choice group's key is spelled
    out per choice (``kl.placement``: grpo `loss` · ppo `reward` · dpo `none`)."""
    if value is MISSING:
        return "–"
    if value == "???":
        return "filled by its group"
    match = _INTERPOLATION.match(value) if isinstance(value, str) else None
    if match and match[1] in CHOICE_NODES:
        group, key = match[1], match[2]
        per_choice = [f"{choice} {code(_raw(conf_dir / group / f'{choice}.yaml').get(key))}"
                      for choice in CHOICE_NODES[group]]
        return f"`{group}.{key}`: " + " · ".join(per_choice)
    return code(value)


def node_section(prefix: str, schema: type, values: Any, notes: dict[str, str],
                 conf_dir: Path, level: int = 3, anchor_base: str | None = None) -> list[str]:
    """A table of the fields of ``schema`` at ``prefix``, defaults from ``values`` (the node
    as its YAML writes it); a field typed by a dataclass gets a table of its own after it.
    Options are linked to as ``#<prefix>.<field>``, or, where each choice of a group has its
    own table, ``#<anchor_base>.<field>`` (``#algo=grpo.clip_eps``)."""
    rows, nested = [], []
    base = anchor_base or prefix
    for f in fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        anchor_id = f"{base}.{f.name}" if base else f.name
        value = _select(values, f.name) if values is not MISSING else MISSING
        if value is MISSING and f.default is not MISSING:
            value = f.default
        inner = dataclass_type(schema, f.type)
        if inner is not None:
            nested += [f"{'#' * (level + 1)} `{key}` {{#{anchor(anchor_id)}-node}}", "",
                       *node_section(key, inner, value,
                                     {k.removeprefix(f"{f.name}."): v for k, v in notes.items()},
                                     conf_dir, level + 1, anchor_id)]
            value = "a node: below"
        shown = value if value == "a node: below" else _default(value, conf_dir)
        rows.append([named(key, anchor_id), shown, allowed(dict(f.metadata)),
                     cell(f.metadata.get("help", "")), cell(notes.get(f.name, ""))])
    return [*table(HEADER, rows), *nested]


def _package(path: Path, group: str) -> str:
    """The node a choice's YAML fills (Hydra's ``# @package`` line; default: the group's)."""
    first = path.read_text().splitlines()[0]
    return first.split("@package", 1)[1].strip() if "@package" in first else group


def _groups(conf_dir: Path) -> list[str]:
    chosen = {entry_key: entry_value for entry in OmegaConf.load(conf_dir / "config.yaml").defaults
              if isinstance(entry, dict) or hasattr(entry, "items")
              for entry_key, entry_value in entry.items()}
    rows = []
    for group, choices in config_groups(conf_dir).items():
        default = chosen.get(group)
        shown = ", ".join(f"**{code(c)}**" if c == default else code(c) for c in choices)
        package = _package(conf_dir / group / f"{choices[0]}.yaml", group)
        fills = "keys of other nodes" if package == "_global_" else f"`{package}.*`"
        rows.append([f"[{group}](#{group})", shown, code(default), fills])
    return ["## Config groups", "",
            "Pick a choice with `group=choice` on the command line; the default is in bold "
            "(`null`: none is chosen).", "",
            *table(("group", "choices", "default", "sets"), rows)]


def _run_nodes(conf_dir: Path) -> list[str]:
    base, notes = _raw(conf_dir / "config.yaml"), read_notes(conf_dir / "config.yaml").notes
    lines = ["## Top-level values {#run}", "", *node_section("", RunConfig, base, notes, conf_dir)]
    for node, schema in RUN_NODES.items():
        if node in config_groups(conf_dir):  # a group's choices have a section of their own
            continue
        inner_notes = {k.removeprefix(f"{node}."): v for k, v in notes.items()}
        lines += [f"## `{node}` {{#{node}}}", "", cell(schema.__doc__.strip().splitlines()[0]), "",
                  *node_section(node, schema, base.get(node, MISSING), inner_notes, conf_dir)]
    return lines


def _choices(group: str, conf_dir: Path) -> list[str]:
    """One table per choice of an ``algo``, ``task`` or ``model`` group."""
    lines = [f"## `{group}` {{#{group}}}", ""]
    for choice, schema in CHOICE_NODES[group].items():
        path = conf_dir / group / f"{choice}.yaml"
        yaml = read_notes(path)
        lines += [f"### {group}={choice} {{#{group}-{choice}}}", "", *prose(yaml.header),
                  f"`{group}.{choice_key(group)}: {choice}` picks it.", "",
                  *node_section(group, schema, _raw(path), yaml.notes, conf_dir,
                                anchor_base=f"{group}={choice}")]
    return lines


def _schedules(conf_dir: Path) -> list[str]:
    lines = ["## `kl.schedule`: the schedule group {#schedule}", "",
             "Every schedule also reads `kl.beta`, `kl.target`, `kl.beta_min` and "
             "`kl.beta_max`; its own options are its class's constructor arguments.", ""]
    for path in sorted((conf_dir / "schedule").glob("*.yaml")):
        yaml, values = read_notes(path), _raw(path)
        lines += [f"### schedule={path.stem} {{#schedule-{path.stem}}}", "", *prose(yaml.header),
                  *node_section("kl.schedule", schedule_schema(values), values, yaml.notes,
                                conf_dir, anchor_base=f"schedule={path.stem}")]
    return lines


def _trainer(conf_dir: Path) -> list[str]:
    """One table for the trainer group: each option's value per choice."""
    choices = {p.stem: _raw(p) for p in sorted((conf_dir / "trainer").glob("*.yaml"))}
    rows = []
    for f in fields(TrainerConfig):
        by_value: dict[str, list[str]] = {}
        for choice, values in choices.items():
            by_value.setdefault(_default(values.get(f.name, MISSING), conf_dir), []).append(choice)
        shown = " · ".join(f"{v} ({', '.join(c)})" if len(by_value) > 1 else v
                           for v, c in by_value.items())
        rows.append([named(f"trainer.{f.name}"), shown, allowed(dict(f.metadata)),
                     cell(f.metadata.get("help", "")), ""])
    notes = {name: " ".join(read_notes(conf_dir / "trainer" / f"{name}.yaml").header)
             for name in choices}
    headers = [f"`trainer={name}`" + (f": {cell(note)}" if note else "")
               for name, note in notes.items()]
    return ["## `trainer`: the trainer group {#trainer}", "",
            *(f"* {h}" for h in headers), "", *table(HEADER, rows)]


def _loggers(conf_dir: Path) -> list[str]:
    lines = ["## `logger`: the logger group {#logger}", ""]
    for path in sorted((conf_dir / "logger").glob("*.yaml")):
        yaml, values = read_notes(path), _raw(path)
        schema = logger_schema(values)
        lines += [f"### logger={path.stem} {{#logger-{path.stem}}}", "", *prose(yaml.header)]
        if schema is not None and fields(schema):
            lines += node_section("logger", schema, values, yaml.notes, conf_dir,
                                  anchor_base=f"logger={path.stem}")
    return lines


def _estimators(conf_dir: Path) -> list[str]:
    rows = [[code(p.stem), code(f"kl.estimator: {_raw(p)['kl']['estimator']}")]
            for p in sorted((conf_dir / "estimator").glob("*.yaml"))]
    return ["## `estimator`: the estimator group {#estimator}", "",
            "Unset (`null`), `kl.estimator` is the algorithm's own (`algo.kl_estimator`).", "",
            *table(("choice", "sets"), rows)]


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [item for key, value in node.items()
                for item in _flatten(value, f"{prefix}.{key}" if prefix else str(key))]
    return [(prefix, node)]


def _sweeps(conf_dir: Path) -> list[str]:
    lines = ["## `sweep`: ready-made Optuna sweeps {#sweep}", "",
             "Each preset sets these keys (run it with `python -m klsweep -m sweep=NAME`); "
             "any of them can be overridden on the command line.", ""]
    for path in sorted((conf_dir / "sweep").glob("*.yaml")):
        yaml, values = read_notes(path), _raw(path)
        rows = [[code(key), code(value), cell(yaml.notes.get(key, ""))]
                for key, value in _flatten(values) if key != "hydra.sweep.dir"]
        lines += [f"### sweep={path.stem} {{#sweep-{path.stem}}}", "", *prose(yaml.header),
                  *table(("key", "value", "why"), rows)]
    return lines


def _plugins() -> list[str]:
    from hydra_plugins.klsweep_local.config import KLSweepLocalLauncherConf
    from hydra_plugins.klsweep_optuna.config import KLSweepOptunaConf

    lines = []
    for node, schema, title in (
            ("hydra.sweeper", KLSweepOptunaConf, "the Optuna sweeper (`hydra/sweeper: "
                                                 "klsweep_optuna`, the presets')"),
            ("hydra.launcher", KLSweepLocalLauncherConf, "the launcher (`hydra/launcher: "
                                                         "klsweep_local`, the default)")):
        lines += [f"## `{node}`: {title} {{#{node}}}", ""]
        kept = [f for f in fields(schema) if f.name != "_target_"]
        rows = []
        nested = []
        for f in kept:
            default = f.default_factory() if f.default is MISSING else f.default
            inner = dataclass_type(schema, f.type)
            if inner is not None:
                nested += node_section(f"{node}.{f.name}", inner, MISSING, {}, Path())
                default = "a node: below"
            rows.append([named(f"{node}.{f.name}"),
                         default if inner is not None else code(default), "",
                         cell(f.metadata.get("help", "")), ""])
        lines += [*table(HEADER, rows), *nested]
    return lines


def _audit(conf_dir: Path) -> list[str]:
    path = conf_dir / "audit.yaml"
    notes = {k.removeprefix("audit."): v for k, v in read_notes(path).notes.items()}
    return ["## `audit`: python -m klsweep.audit {#audit}", "",
            cell(AuditConfig.__doc__.strip()), "",
            *node_section("audit", AuditConfig, _raw(path)["audit"], notes, conf_dir)]


def configuration_page(conf_dir: Path = CONF_DIR) -> str:
    """The whole page, as Markdown."""
    lines = [*WIDE, "# Configuration reference", "",
             "Generated from the typed dataclasses that validate a run's config and feed "
             "`python -m klsweep [overrides] --help` (each option's kind, bounds and help "
             "line), and from the YAML files of `conf/` (each default, and the comment beside "
             "it that gives its source). "
             "Any value can be set on the command line: `python -m klsweep kl.beta=0.1`.", "",
             *_groups(conf_dir), *_run_nodes(conf_dir), *_schedules(conf_dir),
             *_estimators(conf_dir), *_trainer(conf_dir)]
    for group in CHOICE_NODES:
        lines += _choices(group, conf_dir)
    lines += [*_loggers(conf_dir), *_sweeps(conf_dir), *_plugins(), *_audit(conf_dir)]
    return "\n".join(lines) + "\n"
