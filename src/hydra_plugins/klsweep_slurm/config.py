"""The schema of ``hydra.launcher`` for ``hydra/launcher=submitit_slurm``: hydra-submitit-
launcher's own (every option of it: partition, timeout_min, cpus_per_task, gpus_per_task,
mem_gb, nodes, tasks_per_node, additional_parameters, ...), run by klsweep's launcher and with
klsweep's defaults where they differ.

It is stored under the plugin's own name, ``submitit_slurm``, replacing the plugin's entry:
Hydra's plugin scan runs this module after hydra-submitit-launcher's config (the scan takes the
packages of ``hydra_plugins`` in order of sys.path, where an editable install's src/ comes
after site-packages, and by name within one directory, where ``klsweep_slurm`` sorts after
``hydra_submitit_launcher``); tests/test_slurm_checks.py checks that the name composes to
klsweep's launcher."""

from dataclasses import dataclass
from importlib.util import find_spec

from hydra.core.config_store import ConfigStore

if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:  # the cluster extra
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    @dataclass
    class KLSweepSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.klsweep_slurm._launcher.KLSweepSlurmLauncher"
        name: str = "klsweep"  # the jobs' name in squeue
        # trials running at once, as one job array (sbatch --array=0-N%array_parallelism); the
        # Optuna sweeper asks this many a batch (hydra.sweeper.n_jobs overrides it), and a
        # sampler learns only between batches: a large value trades guidance for throughput
        array_parallelism: int = 4
        # requeues of a trial whose job reaches its time limit (Slurm warns signal_delay_s
        # before it; the run checkpoints after its step and submitit requeues the job):
        # submitit's own default. The plugin's 0 is for runs that cannot resume; klsweep's do
        max_num_timeout: int = 3

    ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm",
                                 node=KLSweepSlurmConf, provider="klsweep")
