"""klsweep: sweeps of the KL penalty in KL-regularised policy optimisation."""

__version__ = "0.1.0"
