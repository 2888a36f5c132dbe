"""Optuna storage URLs that keep their password private.

``env:NAME`` names an environment variable that holds the URL: the sweeper and each trial read
it from their own environment, so no config, override or log line holds the password. A URL
without a password (SQLite, or PostgreSQL with libpq's ``PGPASSFILE``, ``~/.pgpass`` or
``PGPASSWORD``) is used as it is. Wherever a URL is shown, its password is masked.
"""

from __future__ import annotations

import os

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "env:"


def resolve_storage(storage: str) -> str:
    """The URL ``storage`` stands for: itself, or for ``env:NAME`` the value of NAME."""
    if not storage.startswith(ENV_PREFIX):
        return storage
    name = storage.removeprefix(ENV_PREFIX)
    url = os.environ.get(name)
    if not url:
        raise ValueError(f"storage {storage} names the environment variable {name}, which is "
                         f"not set in this process")
    return url


def has_password(url: str) -> bool:
    try:
        return make_url(url).password is not None
    except ArgumentError:
        return False


def mask_password(url: str) -> str:
    """``url`` as logs and files may show it: ``postgresql://user:***@host/db``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL, so no part of it can be told to be the password
        return "<not a database URL>"
