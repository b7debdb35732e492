"""Every platform test runs on SQLite (a file in tmp_path) and on PostgreSQL at 127.0.0.1:5432:
one database `tokenmill_test_<random>` per session, dropped at the end, and a fresh schema in it
per test (so runs and tests never share tables). PostgreSQL tests skip where it is unreachable
(the session's database is tests/conftest.py's `pg_database`). The limiter tests run on
both backends (`new_limiter`): in this process, and in Redis at 127.0.0.1:6379 under a prefix of
their own, skipped where it is unreachable."""

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


@pytest.fixture
def redis_client(redis_url):
    """A client of it, as the limiter makes one."""
    from tokenmill.platform.redis_limits import connect

    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_limiters(redis_client):
    """redis_limiters(clock=None, **options) -> a new RedisLimiter under a prefix of its own,
    whose keys are deleted at the end."""
    from tokenmill.platform.redis_limits import RedisLimiter

    made = []

    def new(clock=None, **options) -> RedisLimiter:
        made.append(RedisLimiter(redis_client, f"tokenmill-test:{secrets.token_hex(6)}:", clock,
                                 **options))
        return made[-1]

    yield new
    for limiter in made:
        names = list(redis_client.scan_iter(match=f"{limiter.prefix}*", count=1000))
        if names:
            redis_client.delete(*names)


@pytest.fixture(params=["in_process", "redis"])
def new_limiter(request):
    """new_limiter(clock) -> a fresh limiter on that clock: in-process, or in Redis (where the
    machines' clocks, running up to about an hour, lose no reservation)."""
    if request.param == "in_process":
        from tokenmill.platform.limits import InProcessLimiter

        return InProcessLimiter
    new = request.getfixturevalue("redis_limiters")
    return lambda clock: new(clock, lost_after_s=86_400.0)
