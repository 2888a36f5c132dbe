"""Compare klsweep runs side by side: ``python -m klsweep.report PATH...`` (``cli``).

``runs`` reads run dirs and groups them by everything but the seed, ``markdown`` writes
runs.csv and report.md, ``figures`` draws the trajectories and frontiers, ``wandb_run`` logs
it all to a W&B run of job_type=report.
"""

from klsweep.report.cli import build_report, main

__all__ = ["build_report", "main"]
