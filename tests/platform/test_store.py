"""The store: migrations, upgrade in place, SQLite pragmas, URLs and unreachable stores."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from tokenmill.platform.db import ApiKey, UsageRecord
from tokenmill.platform.store import (StoreUnavailable, default_url, normalise_url,
                                      open_store)

API_KEYS_COLUMNS = ["id", "name", "key_hash", "display", "admin", "rpm", "tpm", "budget_pico",
                    "models", "expires_at", "revoked_at", "created_at", "last_used_at"]
USAGE_COLUMNS = ["id", "key_id", "model", "prompt_tokens", "cached_tokens", "completion_tokens",
                 "cost_pico", "status", "finish_reason", "created_at", "finished_at"]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def _schema(store) -> dict:
    inspector = inspect(store.engine)
    return {table: [column["name"] for column in inspector.get_columns(table)]
            for table in sorted(inspector.get_table_names())}


def _version(store) -> list:
    with store.read() as session:
        return session.execute(text("SELECT version_num FROM alembic_version")).scalars().all()


def test_migrations_create_exactly_the_expected_tables(store):
    assert _schema(store) == {"alembic_version": ["version_num"], "api_keys": API_KEYS_COLUMNS,
                              "usage_records": USAGE_COLUMNS}
    assert _version(store) == ["0001"]
    indexes = {ix["name"]: (ix["column_names"], bool(ix["unique"]))
               for ix in inspect(store.engine).get_indexes("usage_records")}
    assert indexes == {"ix_usage_records_key_id": (["key_id"], False),
                       "ix_usage_records_model": (["model"], False),
                       "ix_usage_records_created_at": (["created_at"], False)}
    key_indexes = {ix["name"]: (ix["column_names"], bool(ix["unique"]))
                   for ix in inspect(store.engine).get_indexes("api_keys")}
    assert key_indexes["ix_api_keys_key_hash"] == (["key_hash"], True)


def test_upgrading_twice_is_a_noop_and_keeps_the_rows(store_url):
    first = open_store(store_url)
    with first.write() as session:
        session.add(ApiKey(name="kept", key_hash="ab" * 32, display="sk-tm-abcd...wxyz",
                           admin=False, created_at=T0))
    schema = _schema(first)
    first.close()
    second = open_store(store_url)
    try:
        assert _schema(second) == schema
        assert _version(second) == ["0001"]
        with second.read() as session:
            assert session.scalars(select(ApiKey.name)).all() == ["kept"]
    finally:
        second.close()


def test_times_read_back_as_the_same_instant_in_utc(store):
    plus_two = timezone(timedelta(hours=2))
    with store.write() as session:
        session.add(ApiKey(name="t", key_hash="cd" * 32, display="d", admin=False,
                           created_at=datetime(2025, 3, 1, 14, 0, tzinfo=plus_two)))
    with store.read() as session:
        created = session.scalar(select(ApiKey.created_at))
    assert created == T0
    assert created.tzinfo == timezone.utc


def test_usage_records_need_an_existing_key(store):
    with pytest.raises(IntegrityError):
        with store.write() as session:
            session.add(UsageRecord(id="chatcmpl-1", key_id=999, model="m", prompt_tokens=1,
                                    cached_tokens=0, completion_tokens=1, cost_pico=1,
                                    status="completed", finish_reason="stop", created_at=T0,
                                    finished_at=T0))


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'sub' / 'tokenmill.db'}")
    try:
        with store.read() as session:
            pragmas = [session.execute(text(f"PRAGMA {name}")).scalar()
                       for name in ("journal_mode", "busy_timeout", "foreign_keys")]
        assert pragmas == ["wal", 5000, 1]
    finally:
        store.close()


def test_postgres_urls_use_psycopg3():
    assert normalise_url("postgresql://u:p@h:5432/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:///x.db").drivername == "sqlite"


def test_default_url_is_tokenmill_db_then_sqlite_in_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENMILL_DB", raising=False)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    assert default_url() == f"sqlite:///{tmp_path / 'tokenmill.db'}"
    monkeypatch.setenv("TOKENMILL_DB", "postgresql://postgres@db/x")
    assert default_url() == "postgresql://postgres@db/x"


def test_an_unreachable_store_is_one_line_without_the_password():
    with pytest.raises(StoreUnavailable) as caught:
        open_store("postgresql://postgres:hunter2secret@127.0.0.1:1/nowhere")
    message = str(caught.value)
    assert message.startswith("store postgresql+psycopg://postgres:***@127.0.0.1:1/nowhere "
                              "unavailable: ")
    assert "hunter2secret" not in message
    assert "\n" not in message


def test_an_unsupported_url_is_refused():
    with pytest.raises(StoreUnavailable, match="unsupported store 'mysql'"):
        open_store("mysql://u@h/db")
