"""Every platform test runs on SQLite (a file in tmp_path) and on PostgreSQL at 127.0.0.1:5432:
one database `tokenmill_test_<random>` per session, dropped at the end, and a fresh schema in it
per test (so runs and tests never share tables). PostgreSQL tests skip where it is unreachable
(the session's database is tests/conftest.py's `pg_database`)."""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A URL of an empty store: a new SQLite file, or a new schema of the session's PostgreSQL
    database (made the connections' search_path)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tokenmill.db'}"
    from sqlalchemy import create_engine, text

    base = request.getfixturevalue("pg_database")
    schema = f"t_{secrets.token_hex(6)}"
    engine = create_engine(base.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture
def store(store_url):
    from tokenmill.platform.store import open_store

    store = open_store(store_url)
    yield store
    store.close()
