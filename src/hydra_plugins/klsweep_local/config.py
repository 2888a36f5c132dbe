"""The schema of ``hydra.launcher`` for ``hydra/launcher: klsweep_local``."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class KLSweepLocalLauncherConf:
    _target_: str = "hydra_plugins.klsweep_local.klsweep_local_launcher.KLSweepLocalLauncher"
    # jobs running at once, each in its own process. null: one per GPU slot (below) when the
    # runs use GPUs, else one per usable CPU core divided by the run's torch threads
    # (`threads`), so trials never oversubscribe the cores
    n_jobs: int | None = None
    # the GPUs (CUDA ids on this node) the sweep places trials on: trainer.devices of them per
    # trial, each trial seeing only its own through CUDA_VISIBLE_DEVICES; null: every GPU this
    # process sees
    gpus: list[int] | None = None
    # one-GPU trials sharing a GPU (small models); 1: never two trials on one GPU
    trials_per_gpu: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="klsweep_local",
                             node=KLSweepLocalLauncherConf, provider="klsweep")
