"""The schema of ``hydra.launcher`` for ``hydra/launcher: klsweep_local``."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class KLSweepLocalLauncherConf:
    _target_: str = "hydra_plugins.klsweep_local.klsweep_local_launcher.KLSweepLocalLauncher"
    # jobs running at once, each in its own process. null: one per usable CPU core divided by
    # the run's torch threads (`threads`), so trials never oversubscribe the cores; one at a
    # time when the runs use a GPU (set it to run several trials on one device)
    n_jobs: int | None = None


ConfigStore.instance().store(group="hydra/launcher", name="klsweep_local",
                             node=KLSweepLocalLauncherConf, provider="klsweep")
