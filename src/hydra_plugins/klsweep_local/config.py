"""The schema of ``hydra.launcher`` for ``hydra/launcher: klsweep_local``: each field's
default and its help line (``metadata["help"]``, which the site's configuration reference
shows)."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class KLSweepLocalLauncherConf:
    _target_: str = "hydra_plugins.klsweep_local.klsweep_local_launcher.KLSweepLocalLauncher"
    # null spreads the jobs so that trials never oversubscribe the cores or share a GPU
    n_jobs: int | None = field(default=None, metadata={"help": (
        "jobs running at once, each in its own process; null: one per GPU slot when the runs "
        "use GPUs, else one per usable CPU core divided by the run's torch threads (threads)")})
    gpus: list[int] | None = field(default=None, metadata={"help": (
        "the GPUs (CUDA ids on this node) the sweep places trials on: trainer.devices of them "
        "per trial, each trial seeing only its own through CUDA_VISIBLE_DEVICES; null: every "
        "GPU this process sees")})
    trials_per_gpu: int = field(default=1, metadata={"help": (
        "one-GPU trials sharing a GPU (small models); 1: never two trials on one GPU")})


ConfigStore.instance().store(group="hydra/launcher", name="klsweep_local",
                             node=KLSweepLocalLauncherConf, provider="klsweep")
