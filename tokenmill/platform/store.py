"""The store: one SQL database (SQLite by default, or PostgreSQL) holding keys and usage.

`open_store` connects, migrates to the newest schema (Alembic `upgrade head`, so an existing store
upgrades in place) and returns a `Store`. Every method of the platform is synchronous and may
block on the database (SQLite waits up to 5 s for the write lock): nothing here may be called on
the event loop or the engine's step thread; the server calls it through `asyncio.to_thread`.

SQLite has one writer path: write transactions begin with `BEGIN IMMEDIATE`, so a writer takes
the lock up front and waits for it (busy timeout), instead of failing with "database is locked"
when a read transaction tries to upgrade; reads begin deferred and never block writers (WAL).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from tokenmill.models.default import tokenmill_home

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 5000
_BEGIN = "tokenmill_sqlite_begin"  # execution option: how a SQLite transaction begins
_MIGRATION_LOCK = 0x746F6B656E  # PostgreSQL advisory lock id held while migrating


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or used; the message is one line and holds no password."""


def default_url() -> str:
    """`$TOKENMILL_DB`, else `sqlite:///$TOKENMILL_HOME/tokenmill.db`."""
    return os.environ.get("TOKENMILL_DB") or f"sqlite:///{tokenmill_home() / 'tokenmill.db'}"


def normalise_url(url: str):
    """A SQLAlchemy URL; `postgres://` and `postgresql://` use the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreUnavailable(f"unsupported store {parsed.drivername!r}: use sqlite:///PATH or "
                               "postgresql://...")
    return parsed


class Store:
    """The engine and sessions of one store. `read()` and `write()` give a session inside one
    transaction, committed on success and rolled back on error; a database error that means the
    store is unreachable or busy past its timeout surfaces as `StoreUnavailable`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**{_BEGIN: "IMMEDIATE"}),
                                   expire_on_commit=False)

    @property
    def url(self) -> str:
        """The store's URL with any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._guard(), self._read.begin() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._guard(), self._write.begin() as session:
            yield session

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (exc.OperationalError, exc.InterfaceError) as error:
            raise StoreUnavailable(_one_line(self, error)) from error

    def close(self) -> None:
        self.engine.dispose()


def open_store(url: str | None = None) -> Store:
    """Connect to `url` (default: `default_url()`), migrate it to the newest schema and return
    the store; `StoreUnavailable` if it cannot be reached or migrated."""
    parsed = normalise_url(url or default_url())
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
    else:
        engine = create_engine(parsed, pool_pre_ping=True)
    store = Store(engine)
    try:
        _upgrade(store)
    except (exc.OperationalError, exc.InterfaceError, StoreUnavailable) as error:
        engine.dispose()
        if isinstance(error, StoreUnavailable):
            raise
        raise StoreUnavailable(_one_line(store, error)) from error
    return store


def _sqlite_engine(url) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get(_BEGIN, '')}")

    return engine


def _upgrade(store: Store) -> None:
    """Alembic `upgrade head` inside one write transaction: on SQLite it holds the write lock, on
    PostgreSQL an advisory lock, so processes starting together migrate one after the other."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store._write.begin() as session:
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _one_line(store: Store, error: Exception) -> str:
    detail = str(getattr(error, "orig", None) or error).strip().splitlines()
    message = detail[0] if detail else type(error).__name__
    password = store.engine.url.password
    if password:
        message = message.replace(str(password), "***")
    return f"store {store.url} unavailable: {message}"
