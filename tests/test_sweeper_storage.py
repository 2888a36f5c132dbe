"""The storage URL stays private: masked wherever it is shown, read from an environment
variable for ``env:NAME``, and a password never handed to trials (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydra_plugins.klsweep_optuna._errors import SweepConfigError
from hydra_plugins.klsweep_optuna._storage import TRIAL_ENV, StorageURL, study_storage
from klsweep.storage import mask_password, resolve_storage

SECRET = "postgresql://klsweep:s3cr%40t@db.example:5432/sweeps"
SWEEP_DIR = Path("/sweeps/beta_target")


@pytest.mark.parametrize(("url", "shown"), [
    (SECRET, "postgresql://klsweep:***@db.example:5432/sweeps"),
    ("postgresql+psycopg://klsweep:pw@127.0.0.1/db",
     "postgresql+psycopg://klsweep:***@127.0.0.1/db"),
    ("postgresql://klsweep@127.0.0.1/db", "postgresql://klsweep@127.0.0.1/db"),
    ("sqlite:////sweeps/beta_target/optuna.db", "sqlite:////sweeps/beta_target/optuna.db"),
    # the drivers also read the password from the query
    ("postgresql://klsweep@db/sweeps?password=s3cret&sslmode=require",
     "postgresql://klsweep@db/sweeps?password=***&sslmode=require"),
    ("mysql+pymysql://klsweep@db/sweeps?passwd=s3cret", "mysql+pymysql://klsweep@db/sweeps?passwd=***"),
    ("not a url: pw", "<not a database URL>"),
])
def test_a_shown_url_has_its_password_masked(url, shown):
    assert mask_password(url) == shown


def test_env_name_reads_the_url_from_that_variable(monkeypatch):
    monkeypatch.setenv("KLSWEEP_DB", SECRET)
    assert resolve_storage("env:KLSWEEP_DB") == SECRET
    assert resolve_storage("sqlite:///optuna.db") == "sqlite:///optuna.db"
    monkeypatch.delenv("KLSWEEP_DB")
    with pytest.raises(ValueError, match="names the environment variable KLSWEEP_DB, which is "
                                         "not set"):
        resolve_storage("env:KLSWEEP_DB")


def test_trials_get_the_url_only_when_it_holds_no_password(monkeypatch):
    monkeypatch.setenv("KLSWEEP_DB", SECRET)
    sqlite = f"sqlite:///{SWEEP_DIR / 'optuna.db'}"
    assert study_storage(None, interpolated=False, sweep_dir=SWEEP_DIR) == StorageURL(sqlite,
                                                                                     sqlite)
    pgpass = "postgresql://klsweep@db.example/sweeps"  # libpq finds the password itself
    assert study_storage(pgpass, interpolated=False, sweep_dir=SWEEP_DIR) == StorageURL(pgpass,
                                                                                       pgpass)
    named = study_storage("env:KLSWEEP_DB", interpolated=False, sweep_dir=SWEEP_DIR)
    assert named == StorageURL(SECRET, "env:KLSWEEP_DB")
    assert named.shown == "postgresql://klsweep:***@db.example:5432/sweeps"
    # ${oc.env:KLSWEEP_DB}: resolved before the sweeper sees it; trials read it from TRIAL_ENV
    assert study_storage(SECRET, interpolated=True, sweep_dir=SWEEP_DIR) == StorageURL(
        SECRET, f"env:{TRIAL_ENV}", {TRIAL_ENV: SECRET})
    # a password among the query's options is a password too
    in_query = "postgresql://klsweep@db.example/sweeps?password=s3cret"
    assert study_storage(in_query, interpolated=True, sweep_dir=SWEEP_DIR) == StorageURL(
        in_query, f"env:{TRIAL_ENV}", {TRIAL_ENV: in_query})


def test_a_password_written_into_the_setting_is_refused_without_showing_it():
    with pytest.raises(SweepConfigError) as caught:
        study_storage(SECRET, interpolated=False, sweep_dir=SWEEP_DIR)
    message = str(caught.value)
    assert "s3cr" not in message and "klsweep:***@db.example" in message
    assert "set hydra.sweeper.storage=env:NAME" in message and "\n" not in message


def test_an_unset_variable_fails_before_any_trial_with_one_line(monkeypatch):
    monkeypatch.delenv("KLSWEEP_DB", raising=False)
    with pytest.raises(SweepConfigError, match="^klsweep: error: hydra.sweeper.storage: storage "
                                               "env:KLSWEEP_DB names the environment variable"):
        study_storage("env:KLSWEEP_DB", interpolated=False, sweep_dir=SWEEP_DIR)
