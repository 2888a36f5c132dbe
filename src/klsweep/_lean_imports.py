"""torchmetrics without the optional packages it would import for nothing.

Lightning imports torchmetrics, and torchmetrics, as it is imported, imports every optional
package it finds installed: transformers (for BERTScore), matplotlib.pyplot (for plots) and
scipy.signal (for audio metrics). In a klsweep run that is 118 MiB of a 500 MiB peak and
about 2 s of its start, for metrics klsweep never computes. While torchmetrics is imported,
its availability checks (lightning_utilities' ``_version`` and ``find_spec``) report those
three packages absent; nothing else changes: klsweep imports transformers itself for
``model=hf``, and matplotlib for the report.

Only klsweep's own command-line processes install it (``python -m klsweep``, ``python -m
klsweep.bench``): ``import klsweep`` in a user's process changes nothing of its imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from types import ModuleType
from typing import Any

UNUSED = ("transformers", "matplotlib", "scipy")


def _unused(name: str) -> bool:
    return name.split(".")[0] in UNUSED


@contextmanager
def _reported_absent() -> Any:
    """lightning_utilities' checks, as torchmetrics calls them, blind to ``UNUSED``."""
    from lightning_utilities.core import imports as checks

    version, find_spec = checks._version, checks.find_spec

    def blind_version(name: str) -> Any:
        if _unused(name):
            raise PackageNotFoundError(name)
        return version(name)

    def blind_find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if _unused(name) else find_spec(name, *args, **kwargs)

    checks._version, checks.find_spec = blind_version, blind_find_spec
    try:
        yield
    finally:
        checks._version, checks.find_spec = version, find_spec
        checks.package_available.cache_clear()  # later callers see the truth


class _Loader(importlib.abc.Loader):
    """torchmetrics' own loader, run with the checks blind."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _reported_absent():
            self.loader.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds torchmetrics once, through the other finders, and wraps its loader."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torchmetrics":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Before torchmetrics' first import only; a no-op when it is already imported (or
    lightning_utilities lacks the checks this relies on)."""
    if "torchmetrics" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    try:
        from lightning_utilities.core import imports as checks
    except ImportError:
        return
    if hasattr(checks, "_version") and hasattr(checks, "find_spec"):
        sys.meta_path.insert(0, _Finder())
