"""The command-line reference, generated: each command's own ``--help`` (its argparse parser,
asked in this process), the entry point's header and the scripts' docstrings."""

from __future__ import annotations

import ast
import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path

from klsweep.config import CONF_DIR
from klsweep.site.tables import WIDE

REPO = CONF_DIR.parent
SRC = Path(__file__).resolve().parents[1]
HELP_WIDTH = "88"  # the columns argparse wraps at: a help line fits the page unscrolled


def _help(main: Callable[[list[str]], object], argv: list[str]) -> str:
    """What ``main(argv)`` prints for ``--help``, at a fixed width."""
    out = io.StringIO()
    width = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        if width is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = width
    return out.getvalue().rstrip()


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _constant(path: Path, name: str) -> str:
    """A module-level string constant, read without importing the module (the entry point
    sets up its process when imported)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{name} is not a constant of {path}")


def _shell_header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines).strip()


def _block(text: str, language: str = "text") -> list[str]:
    """A fenced block; a docstring's reStructuredText literals (````x````) read as plain text."""
    return [f"```{language}", text.replace("``", ""), "```", ""]


def command_line_page() -> str:
    """The whole page, as Markdown."""
    from klsweep.bench import cli as bench
    from klsweep.bench import engines
    from klsweep.report import cli as report
    from klsweep.rewards import main as rewards

    lines = [*WIDE, "# Command-line reference", "",
             "Generated from each command's own help. Every `python -m klsweep` and "
             "`python -m klsweep.audit` option is a config key: see the "
             "[configuration reference](configuration.md).", "",
             "## python -m klsweep {#klsweep}", "",
             *_block(_constant(SRC / "__main__.py", "_HELP_HEADER").rstrip()),
             "Hydra's flags work as with any Hydra application: `-m` (`--multirun`) runs a "
             "grid or a sweep, `--cfg job` prints the composed config, `--hydra-help` lists "
             "the rest. `python -m klsweep [overrides] --help` prints every option of the "
             "config those overrides compose, with its value and help line (the "
             "[configuration reference](configuration.md) lists every choice's).", "",
             "## python -m klsweep.audit {#audit}", "",
             *_block(_docstring(SRC / "audit" / "__main__.py")),
             "Its options are the run's and [`audit.*`](configuration.md#audit).", "",
             "## python -m klsweep.report {#report}", "",
             *_block(_help(report.main, ["--help"])),
             "## python -m klsweep.bench {#bench}", "",
             *_block(_help(bench.main, ["--help"])),
             "## python -m klsweep.bench.engines {#bench-engines}", "",
             *_block(_help(engines.main, ["--help"])),
             "## python -m klsweep.rewards {#rewards}", "",
             *_block(_help(rewards, ["make-arithmetic", "--help"])),
             "## Scripts {#scripts}", "",
             "Run from the repository root.", ""]
    for path in sorted((REPO / "scripts").iterdir()):
        if path.suffix == ".py":
            text = _docstring(path)
        elif path.suffix == ".sh":
            text = _shell_header(path)
        else:
            continue
        lines += [f"### scripts/{path.name} {{#{path.stem}}}", "", *_block(text)]
    return "\n".join(lines) + "\n"
