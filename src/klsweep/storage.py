"""Optuna storage URLs that keep their password private.

``env:NAME`` names an environment variable that holds the URL: the sweeper and each trial read
it from their own environment, so no config, override or log line holds the password. A URL
without a password (SQLite, or PostgreSQL with libpq's ``PGPASSFILE``, ``~/.pgpass`` or
``PGPASSWORD``) is used as it is. Wherever a URL is shown, its password is masked.
"""

from __future__ import annotations

import os
from typing import Any

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


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for an Optuna storage at ``url``: SQLite lets one writer in
    at a time, so the sweeper, its heartbeat and every trial reporting to the pruner wait
    their turn rather than fail with "database is locked" after the driver's default 5 s."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


# query options that the database drivers read as the password (psycopg, libpq, pymysql)
PASSWORD_OPTIONS = ("password", "passwd")


def has_password(url: str) -> bool:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    return parsed.password is not None or any(key in parsed.query for key in PASSWORD_OPTIONS)


def mask_password(url: str) -> str:
    """``url`` as logs and files may show it: ``postgresql://user:***@host/db``, and
    ``?password=***`` where the password is a query option."""
    try:
        parsed = make_url(url)
    except ArgumentError:  # not a URL, so no part of it can be told to be the password
        return "<not a database URL>"
    masked = parsed.update_query_dict(
        {key: "***" for key in PASSWORD_OPTIONS if key in parsed.query})
    # the query's mask is percent-encoded when rendered; shown as typed, like the userinfo's
    return masked.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
