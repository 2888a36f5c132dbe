"""klsweep's local Hydra launcher, selected with ``hydra/launcher: klsweep_local`` (the default
of every klsweep multirun): each job runs in a process forked from the sweep's, several at once.

Hydra scans this package at start-up and imports every module whose name does not start with
``_``: ``config`` (the schema, stored in Hydra's ConfigStore) and ``klsweep_local_launcher``
(the Launcher). ``_forked`` does the work and is imported only when jobs are launched.
"""
