"""The import structure: klsweep's modules import one another without a circle, measured from
the code's own ``import`` statements (those inside functions too: a lazy import hides a
circle, it does not remove it), with the packages' ``__init__`` that Python runs on the way
to a module."""

from __future__ import annotations

import ast
import graphlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("klsweep", "hydra_plugins")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
              modules: set[str]) -> set[str]:
    """The project's modules an import statement names (``from a import b`` names the
    module ``a.b`` where there is one, else ``a``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    base = ".".join(p for p in (package if node.level else "", node.module or "") if p)
    named = {f"{base}.{alias.name}" for alias in node.names} & modules
    return named or ({base} & modules)


def _packages_on_the_way(target: str, module: str) -> set[str]:
    """The packages Python initialises to import ``target`` from ``module``: its ancestors,
    but for those ``module`` is inside (already being initialised)."""
    parts = target.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))
            if not f"{module}.".startswith(".".join(parts[:i]) + ".")}


def import_graph() -> dict[str, set[str]]:
    """Each module of ``PACKAGES`` under src/ → the project's modules it imports."""
    files = {_module_name(p): p for package in PACKAGES for p in (SRC / package).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        imported = set().union(*(
            _imported(node, module, is_package, set(files))
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Import | ast.ImportFrom)))
        on_the_way = set().union(*(_packages_on_the_way(t, module) for t in imported))
        graph[module] = (imported | on_the_way) & set(files) - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_the_graph_sees_imports_of_every_form():
    graph = import_graph()
    assert "klsweep.algos.dpo" in graph["klsweep.algos"]  # a package's __init__
    assert "klsweep.preferences" in graph["klsweep.tasks.proxy"]  # from a module, its names
    assert "klsweep.kl" in graph["klsweep.algos.dpo"]  # from a package, its own names
    assert "klsweep.report.cli" in graph["klsweep.report.__main__"]
    assert "klsweep.models" in graph["klsweep.tasks.base"]  # models/__init__ runs first
    assert "klsweep.tasks" not in graph["klsweep.tasks.digits"]  # its own, already running


def test_a_circle_is_found_when_there_is_one():
    graph = import_graph()
    graph["klsweep.preferences"] = graph["klsweep.preferences"] | {"klsweep.algos.dpo"}
    cycle = _cycle(graph)
    assert cycle is not None and "klsweep.preferences" in cycle


def test_no_module_of_klsweep_imports_itself_back_through_others():
    cycle = _cycle(import_graph())
    if cycle is not None:
        pytest.fail("import circle: " + " -> ".join(cycle))


NOTEBOOK_IMPORTS = ["klsweep", "klsweep.train", "klsweep.config", "klsweep.module",
                    "klsweep.algos", "klsweep.tasks", "klsweep.models", "klsweep.kl",
                    "klsweep.policy", "klsweep.report", "klsweep.bench.run"]
# run in a fresh interpreter: the import finders each import adds to sys.meta_path (by the
# module that defines them), and what torchmetrics (imported by Lightning) believes installed
_PROBE = """
import importlib, json, sys
added = {}
for name in sys.argv[1:]:
    before = list(sys.meta_path)
    importlib.import_module(name)
    added[name] = [type(f).__module__ for f in sys.meta_path if f not in before]
from torchmetrics.utilities import imports
print(json.dumps({"added": added, "matplotlib_seen": bool(imports._MATPLOTLIB_AVAILABLE)}))
"""


def _probe(*modules: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed, so torchmetrics cannot see it")
def test_importing_klsweep_changes_nothing_of_how_its_user_imports():
    probe = _probe(*NOTEBOOK_IMPORTS)
    assert probe["added"]["klsweep"] == []  # sys.meta_path as it was
    # the packages klsweep imports may add their own finders (six, transformers); klsweep none
    assert not [(name, finder) for name, finders in probe["added"].items()
                for finder in finders if finder.startswith("klsweep")]
    assert probe["matplotlib_seen"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed, so torchmetrics cannot see it")
def test_the_command_lines_own_process_skips_torchmetrics_optional_imports():
    # what `python -m klsweep` imports before it runs (`python -m klsweep.bench` alike)
    assert _probe("klsweep.__main__", "klsweep.train")["matplotlib_seen"] is False
