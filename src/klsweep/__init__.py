"""klsweep: sweeps of the KL penalty in KL-regularised policy optimisation."""

from klsweep import _lean_imports

__version__ = "0.1.0"

_lean_imports.install()  # before Lightning imports torchmetrics (see _lean_imports)
