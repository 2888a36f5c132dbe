"""klsweep's Slurm launcher, selected with ``hydra/launcher=submitit_slurm``: hydra-submitit-
launcher's, so that every option of it works, with what a sweep on a cluster needs besides: a
trial whose job Slurm requeues (preemption, ``scontrol requeue``, the time limit) stays one
trial and resumes from its checkpoint; a job that ends without a result (``scancel``, a lost
node) is a FAIL trial with Slurm's reason; bad settings fail in one line before any job.

Hydra scans this package at start-up and imports every module whose name does not start with
``_``: ``config`` (the schema) and ``klsweep_slurm_launcher`` (the Launcher); both stand empty
where hydra-submitit-launcher (the ``cluster`` extra) is not installed. ``_launcher``,
``_checks`` and ``_watch`` do the work and are imported only when a sweep uses the launcher.
"""
