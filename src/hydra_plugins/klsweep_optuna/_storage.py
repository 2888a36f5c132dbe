"""Where the study lives: the URL the sweeper connects with, what its trials are told to
connect with, and how the URL is shown; the password never reaches a config, a trial's
overrides, a file or a log line (see ``klsweep.storage``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from klsweep.storage import ENV_PREFIX, has_password, mask_password, resolve_storage

# Trials are handed a URL holding a password that reached the sweeper by an interpolation
# (${oc.env:X}) through this variable: local launchers' child processes inherit the sweeper's
# environment, and Slurm jobs get the submitting one (sbatch's default, --export=ALL).
TRIAL_ENV = "KLSWEEP_STORAGE"


@dataclass(frozen=True)
class StorageURL:
    url: str  # what Optuna connects with; it may hold a password: never show it
    for_trials: str  # trial.storage: the URL if it holds no password, else env:NAME
    trial_env: dict[str, str] = field(default_factory=dict)  # set for the trials to read

    @property
    def shown(self) -> str:
        return mask_password(self.url)


def study_storage(storage: str | None, *, interpolated: bool, sweep_dir: Path) -> StorageURL:
    """``hydra.sweeper.storage``, resolved: null (SQLite in the sweep dir), ``env:NAME``, or
    a URL. ``interpolated``: whether the setting is an interpolation, as Hydra writes it into
    multirun.yaml and each trial's .hydra/hydra.yaml, so that a password in it stays out."""
    if storage is None:
        url = f"sqlite:///{sweep_dir / 'optuna.db'}"
        return StorageURL(url, url)
    if storage.startswith(ENV_PREFIX):
        try:
            return StorageURL(resolve_storage(storage), storage)
        except ValueError as err:
            raise SweepConfigError(f"hydra.sweeper.storage: {err}") from None
    if not has_password(storage):
        return StorageURL(storage, storage)
    if not interpolated:
        raise SweepConfigError(
            f"hydra.sweeper.storage={mask_password(storage)} holds a password, which Hydra "
            f"would write into multirun.yaml and every trial's .hydra/hydra.yaml: put the URL "
            f"in an environment variable and set hydra.sweeper.storage={ENV_PREFIX}NAME, or "
            f"leave the password out for libpq to find (PGPASSFILE, ~/.pgpass)")
    return StorageURL(storage, ENV_PREFIX + TRIAL_ENV, {TRIAL_ENV: storage})
