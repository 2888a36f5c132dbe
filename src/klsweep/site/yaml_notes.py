"""The comments of a conf/ YAML file, by dotted key: where each default comes from (the paper
or peer it follows), which the configuration reference shows beside the option's help line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# a key may hold dots and slashes (a sweep's params: kl.beta; objectives: reward/final)
_KEY = re.compile(r"(?P<indent>\s*)(?P<key>[A-Za-z_+][\w./]*):(?P<rest>(\s.*)?)$")
_COMMENT = re.compile(r"\s#\s?(?P<text>.*)$")


@dataclass
class YamlNotes:
    """A YAML file's header comment (before its first key) and each key's comment (on its
    line, and the comment lines indented under it that continue it)."""

    header: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def read_notes(path: Path) -> YamlNotes:
    header: list[str] = []
    notes: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the keys enclosing the current line
    last: tuple[int, str] | None = None  # the last key's indent and dotted path
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            last = None
            continue
        if stripped.startswith("#"):
            column = len(line) - len(line.lstrip())
            text = stripped.lstrip("#").strip()
            if last is not None and column > last[0]:
                notes[last[1]].append(text)
            elif not stack and not text.startswith("@package"):
                header.append(text)
            continue
        match = _KEY.match(line)
        if match is None:  # a list item, or a value continued on the next line
            last = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path_key = ".".join([*(key for _, key in stack), match["key"]])
        stack.append((indent, match["key"]))
        comment = _COMMENT.search(match["rest"])
        notes[path_key] = [comment["text"].strip()] if comment else []
        last = (indent, path_key)
    return YamlNotes(header, {key: " ".join(parts) for key, parts in notes.items() if parts})
