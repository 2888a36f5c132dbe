"""The site's generated pages (``mkdocs.yml``'s hook, ``docs/hooks.py``, adds them at build
time): the configuration, metrics and command-line references and the Python API, each read
from the code that a run uses, so that none of them is written by hand or can go stale."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from klsweep.site.api import API_PAGES, api_page


def generated_pages() -> dict[str, Callable[[], str]]:
    """Each generated page's path under docs/ and the function that writes it."""
    from klsweep.site.commands import command_line_page
    from klsweep.site.configuration import configuration_page
    from klsweep.site.metrics_page import metrics_page

    return {"reference/configuration.md": configuration_page,
            "reference/metrics.md": metrics_page,
            "reference/command-line.md": command_line_page,
            **{f"reference/api/{name}": partial(api_page, name) for name in API_PAGES}}
