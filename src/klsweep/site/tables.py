"""Markdown pieces the generated pages share: a table, a cell's escaping, an option's anchor
and the words for what a typed field accepts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# Material's front matter for a page of wide tables: the site's navigation hidden, the page's
# own table of contents kept
WIDE = ["---", "hide:", "  - navigation", "---", ""]


def cell(text: Any) -> str:
    """Plain ``text`` as one table cell: a pipe would end the cell, a newline the row,
    ``<seed>`` would be an HTML tag, ``[a] [b]`` a reference link and ``{_target_: …}`` or
    ``*/final`` emphasis."""
    parts = str(text).split("`")
    parts[::2] = [p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                  .replace("[", "\\[").replace("_", "\\_").replace("*", "\\*")
                  for p in parts[::2]]  # outside code spans, which show their text as it is
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def flow(value: Any) -> str:
    """A value as YAML's flow style writes it: ``null``, ``true``, ``[0.9, 0.999]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    return str(value) if str(value) else "''"


def code(value: Any) -> str:
    """A value as YAML writes it, in a code span."""
    return f"`{flow(value)}`"


def prose(lines: Sequence[str]) -> list[str]:
    """A YAML file's header comment as Markdown: its text as one paragraph, the command lines
    it gives (``python -m klsweep ...``) as a block of their own."""
    text = [line for line in lines if not line.lstrip().startswith("python ")]
    commands = [line.strip() for line in lines if line.lstrip().startswith("python ")]
    out = [cell(" ".join(text)), ""] if text else []
    return out + (["```bash", *commands, "```", ""] if commands else [])


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table (cells already escaped), with a blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def anchor(name: str) -> str:
    """The HTML id of an option or metric: links read ``configuration.md#kl.beta``."""
    return re.sub(r"[^A-Za-z0-9_.@=-]", "-", name)


def named(name: str, anchor_id: str | None = None) -> str:
    """A name in a table's first column: its code span, with the anchor links point to
    (``anchor_id``; default: the name's)."""
    return f'<span id="{anchor(anchor_id or name)}"></span>`{name}`'


def allowed(meta: dict[str, Any]) -> str:
    """What a field declared with ``schema.spec`` accepts, in words."""
    kind = meta.get("kind")
    if kind in ("number", "integer"):
        bounds = [f"{op} {meta[key]}" for key, op in
                  (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")) if key in meta]
        words = f"{kind} {' and '.join(bounds)}".strip()
    elif kind == "choice":
        words = ", ".join(code(c) for c in meta["choices"])
    elif kind == "bool":
        words = "`true`, `false`"
    elif kind == "node":
        words = "a node"
    else:
        words = kind or "any"
    return f"{words}, or `null`" if meta.get("optional") else words
