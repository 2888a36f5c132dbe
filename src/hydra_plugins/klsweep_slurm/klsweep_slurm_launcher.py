"""The Launcher of ``hydra/launcher=submitit_slurm``, where hydra-submitit-launcher (the
``cluster`` extra) is installed: Hydra registers the launchers it finds in this module when it
scans the plugins at start-up, and would warn on every start if the import failed."""

from importlib.util import find_spec

if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from hydra_plugins.klsweep_slurm._launcher import KLSweepSlurmLauncher  # noqa: F401
