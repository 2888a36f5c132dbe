"""klsweep's Hydra sweeper on Optuna 5, selected with ``hydra/sweeper: klsweep_optuna``.

Hydra scans this package at start-up and imports every module whose name does not start
with ``_``: ``config`` (the schema, stored in Hydra's ConfigStore) and
``klsweep_optuna_sweeper`` (the Sweeper). The modules that do the work are private and are
imported only when a sweep runs.
"""
