"""A Markdown extension for the site (``mkdocs.yml``'s ``markdown_extensions``): the star of
an optimum (π*, J*, d*, g*, KL*) is a character, not the start of emphasis. The pages and the
docstrings mkdocstrings renders write it plain, as the papers do; Markdown would otherwise
pair two such stars and set the text between them in italics."""

from __future__ import annotations

import re
import xml.etree.ElementTree as etree

from markdown import Extension
from markdown.inlinepatterns import InlineProcessor
from markdown.util import AtomicString

# a one-letter symbol (or KL) standing alone, then one star: "π*", "R(d*)", "KL*", not
# "forward*" nor the closing "**" of "**… KL**"
STARRED = r"(?<![\w])((?:KL|[πJdgRrθ]))\*(?!\*)"
# above Markdown's emphasis (priority 60), below code spans (190), which keep their stars
PRIORITY = 70


class _Starred(InlineProcessor):
    def handleMatch(self, m: re.Match[str], data: str) -> tuple[etree.Element | str, int, int]:
        return AtomicString(m.group(1) + "*"), m.start(0), m.end(0)


class StarsExtension(Extension):
    def extendMarkdown(self, md) -> None:
        md.inlinePatterns.register(_Starred(STARRED, md), "klsweep_stars", PRIORITY)


def makeExtension(**kwargs) -> StarsExtension:  # Markdown's entry point, by its name
    return StarsExtension(**kwargs)
