"""Typed config nodes: each config group's dataclass declares every field once, with its
kind, bounds and a one-line help in the field's metadata (``spec``). Validation and
``--help`` read these declarations; the code builds the same dataclass from the node
(``from_node``). This module imports nothing of klsweep, so any module can declare its
config here without an import cycle."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line for the user."""


def spec(default: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field described for validation: ``kind`` (number, integer, choice, bool,
    string, list, node), bounds (``ge``, ``gt``, ``le``, ``lt``), ``choices``, ``optional``
    (None allowed) and ``help`` (one line for ``--help``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def from_node(cls: type[T], node: Any) -> T:
    """The dataclass ``cls`` filled from a config node (its keys must be ``cls``'s fields)."""
    return cls(**{f.name: node[f.name] for f in fields(cls) if f.name in node})


def describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    """Raise ConfigError unless ``value`` fits the field description ``meta``."""
    kind = meta.get("kind")
    if value is None and meta.get("optional"):
        return
    got = f"(got {describe(value)})"
    if kind in ("number", "integer"):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = is_int if kind == "integer" else (is_int or isinstance(value, float))
        noun = "an integer" if kind == "integer" else "a number"
        bounds = [f"{op} {meta[name]}" for name, op in
                  (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if name in meta]
        wanted = f"{noun}{' ' + ' and '.join(bounds) if bounds else ''}"
        if not ok or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{key} must be {wanted} {got}")
        if not (value >= meta.get("ge", -math.inf) and value > meta.get("gt", -math.inf)
                and value <= meta.get("le", math.inf) and value < meta.get("lt", math.inf)):
            raise ConfigError(f"{key} must be {wanted} {got}")
    elif kind == "choice":
        # by type too: 1 == True, and a choice of true/false takes no number
        if not any(type(value) is type(c) and value == c for c in meta["choices"]):
            allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                                for c in meta["choices"])
            raise ConfigError(f"{key} must be one of {allowed} {got}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false {got}")
    elif kind == "string":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string {got}")
    elif kind == "list":
        if not isinstance(value, (list, tuple, ListConfig)):
            raise ConfigError(f"{key} must be a list {got}")
    elif kind == "node":
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"{key} must be a config node {got}")


def check_node(prefix: str, node: Any, schema: type) -> None:
    """Check every field of ``node`` against the dataclass ``schema``: no unknown keys (but
    Hydra's ``_target_``), no missing keys, every value of the right kind and range; a
    field typed by a dataclass is a node checked against it in turn."""
    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"{prefix} must be a config node (got {describe(node)})")
    names = [f.name for f in fields(schema)]
    for key in node:
        if key not in names and key != "_target_":
            raise ConfigError(f"{prefix}.{key} is not a known key "
                              f"(allowed under {prefix}: {', '.join(names)})")
    for f in fields(schema):
        if f.name not in node:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{prefix}.{f.name} is missing")
            continue
        check_value(f"{prefix}.{f.name}", node[f.name], dict(f.metadata))
        inner = dataclass_type(schema, f.type)
        if inner is not None:
            check_node(f"{prefix}.{f.name}", node[f.name], inner)


def dataclass_type(schema: type, annotation: Any) -> type | None:
    """The dataclass a field's annotation names (a string under ``from __future__ import
    annotations``, looked up where ``schema`` is defined); None for any other type."""
    if isinstance(annotation, str):
        annotation = vars(sys.modules[schema.__module__]).get(annotation)
    return annotation if isinstance(annotation, type) and is_dataclass(annotation) else None


def check_nodes(cfg: Any, schemas: Sequence[tuple[str, type]]) -> None:
    """Check a whole config in one descent: the node at each dotted key of ``schemas``
    against its dataclass ('' is the root's own fields), then every dataclass's
    ``check_run(cfg)``, the checks that span several keys."""
    for key, schema in schemas:
        if key:
            check_node(key, _select(cfg, key), schema)
        else:
            for f in fields(schema):
                check_value(f.name, cfg[f.name], dict(f.metadata))
    for _, schema in schemas:
        check_run = getattr(schema, "check_run", None)
        if check_run is not None:
            check_run(cfg)


def _select(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node
