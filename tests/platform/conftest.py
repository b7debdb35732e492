"""Every platform test runs on SQLite (a file in tmp_path) and on PostgreSQL at 127.0.0.1:5432:
one database `tokenmill_test_<random>` per session, dropped at the end, and a fresh schema in it
per test (so runs and tests never share tables). PostgreSQL tests skip where it is unreachable."""

from __future__ import annotations

import secrets
import socket

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/test"


def _pg_reachable() -> bool:
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_database():
    """The URL of a fresh PostgreSQL database for this session, dropped afterwards."""
    if not _pg_reachable():
        pytest.skip(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}")
    from sqlalchemy import create_engine, text

    name = f"tokenmill_test_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


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
