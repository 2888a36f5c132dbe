"""Reading the answer out of a completion, the way real instruction-tuned models write it.

A model that restates the problem before it answers ("49 - 97 = -48") puts the answer last,
not first, and a model asked for a format writes ``<answer>-48</answer>``. One rule for every
verifiable reward of klsweep (the text task's ``arithmetic``, ``task=reasoning``):

1. the content of the **last** ``<answer>…</answer>`` pair (the tag name configurable), with
   the surrounding whitespace stripped: reasoning-gym's own ``extract_answer`` reads it so;
2. without a tag, a **fallback**: ``last_number``, the last number in the completion (an
   optional sign that does not follow a digit, thousands separated by commas allowed, an
   optional decimal part); ``completion``, the whole completion stripped; or ``none``.

Pure functions on strings; nothing of klsweep is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FALLBACKS = ("last_number", "completion", "none")

# a sign counts only where it does not follow a digit: in "5-3" the numbers are 5 and 3
_NUMBER = re.compile(r"(?<![\d.,])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def tagged_answer(text: str, tag: str = "answer") -> str | None:
    """The stripped content of the last ``<tag>…</tag>`` in ``text``; None without one."""
    matches = re.findall(f"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` as it is written (commas kept); None if none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def number_value(text: str) -> float:
    """The value of a number ``last_number`` found (commas are thousands separators)."""
    return float(text.replace(",", ""))


@dataclass(frozen=True)
class Extracted:
    """The answer read from a completion, and whether it came from the tag."""

    answer: str | None
    tagged: bool


def extract_answer(text: str, *, tag: str = "answer", fallback: str = "last_number") -> Extracted:
    """The answer of ``text``: the last tagged answer, else the ``fallback``'s (see the
    module's docstring)."""
    tagged = tagged_answer(text, tag)
    if tagged is not None:
        return Extracted(tagged, True)
    if fallback == "last_number":
        return Extracted(last_number(text), False)
    if fallback == "completion":
        stripped = text.strip()
        return Extracted(stripped or None, False)
    if fallback == "none":
        return Extracted(None, False)
    raise ValueError(f"unknown answer fallback {fallback!r} (allowed: {', '.join(FALLBACKS)})")


def numeric_answer(text: str, tag: str = "answer") -> float | None:
    """The number a completion answers with: the last number inside its last tagged answer,
    else the last number of the whole completion; None when there is none."""
    inside = tagged_answer(text, tag)
    found = last_number(text if inside is None else inside)
    return None if found is None else number_value(found)
