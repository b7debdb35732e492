"""The usage spool on SQLite and PostgreSQL: records appended while the store is down reach the
ledger once it is back, exactly once, whatever a crash left in the file."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine

from tokenmill.platform.keys import KeyService
from tokenmill.platform.ledger import Ledger, UsageEntry
from tokenmill.platform.spool import UsageSpool
from tokenmill.platform.store import Store, StoreUnavailable

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # nothing listens on port 1


def entry(rid: str, key_id: int, cost: int = 1_000) -> UsageEntry:
    return UsageEntry(id=rid, key_id=key_id, model="m/a", prompt_tokens=10, cached_tokens=2,
                      completion_tokens=5, cost_pico=cost, status="completed",
                      finish_reason="stop", created_at=T0,
                      finished_at=T0 + timedelta(seconds=1, microseconds=250))


@pytest.fixture
def key_id(store) -> int:
    keys = KeyService(store)
    return keys.authenticate(keys.create("alice")[0]).key_id


@pytest.fixture
def spool(tmp_path) -> UsageSpool:
    return UsageSpool(tmp_path / "usage-spool.jsonl")


def test_spooled_records_reach_the_ledger_unchanged_and_the_spool_empties(store, key_id, spool):
    entries = [entry(f"chatcmpl-{i}", key_id, cost=1_000 + i) for i in range(3)]
    assert not spool.pending()
    for e in entries:
        spool.append(e)
    assert spool.pending()
    ledger = Ledger(store)
    assert spool.replay(ledger) == 3
    assert not spool.pending()
    assert ledger.query(key_id).data == entries  # every field, times included, round-trips


def test_a_replay_repeated_after_a_crash_adds_no_row(store, key_id, spool, tmp_path):
    spool.append(entry("chatcmpl-1", key_id))
    # A crash after the ledger write but before the spool was emptied leaves the file as it was.
    shutil.copy(spool.path, tmp_path / "copy")
    ledger = Ledger(store)
    assert spool.replay(ledger) == 1
    shutil.copy(tmp_path / "copy", spool.path)
    assert spool.replay(ledger) == 0
    assert len(ledger.query(key_id).data) == 1 and ledger.spend(key_id) == 1_000


def test_a_torn_line_is_set_aside_and_the_rest_replayed(store, key_id, spool):
    spool.append(entry("chatcmpl-1", key_id))
    with open(spool.path, "ab") as f:
        f.write(b'{"id":"chatcmpl-2","key_')  # a crash in the middle of an append
    assert spool.replay(Ledger(store)) == 1
    rejected = spool.path.with_name(spool.path.name + ".rejected")
    assert rejected.read_bytes() == b'{"id":"chatcmpl-2","key_\n'
    assert not spool.pending()


def test_a_replay_into_an_unreachable_store_keeps_every_record(store, key_id, spool):
    spool.append(entry("chatcmpl-1", key_id))
    spool.append(entry("chatcmpl-2", key_id))
    before = spool.path.read_bytes()
    down = Ledger(Store(create_engine(UNREACHABLE)))
    with pytest.raises(StoreUnavailable):
        spool.replay(down)
    assert spool.path.read_bytes() == before
    assert spool.replay(Ledger(store)) == 2
