"""The usage ledger on SQLite and PostgreSQL: one record per response id whatever retries or
concurrent writers do, and the queries behind /v1/usage (filters, pages, exact totals)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from tokenmill.platform.db import UsageRecord
from tokenmill.platform.keys import KeyService
from tokenmill.platform.ledger import Ledger, UsageEntry

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def ledger(store):
    return Ledger(store)


@pytest.fixture
def key_ids(store):
    keys = KeyService(store)
    return [keys.authenticate(keys.create(name)[0]).key_id for name in ("alice", "bob")]


def entry(rid: str, key_id: int, minute: int = 0, model: str = "m/a", cost: int = 1_000,
          status: str = "completed") -> UsageEntry:
    at = T0 + timedelta(minutes=minute)
    return UsageEntry(id=rid, key_id=key_id, model=model, prompt_tokens=10, cached_tokens=2,
                      completion_tokens=5, cost_pico=cost, status=status, finish_reason="stop",
                      created_at=at, finished_at=at + timedelta(seconds=1))


def test_a_record_is_written_once_whatever_retries_and_racing_writers_do(store, ledger, key_ids):
    alice = key_ids[0]
    assert ledger.record(entry("chatcmpl-1", alice)) is True
    assert ledger.record(entry("chatcmpl-1", alice, cost=999)) is False  # a retry: no change
    results = []

    def write():
        results.append(ledger.record(entry("chatcmpl-2", alice)))

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    with store.read() as session:
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == 2
        assert session.get(UsageRecord, "chatcmpl-1").cost_pico == 1_000
    assert ledger.query(alice).data == [entry("chatcmpl-1", alice), entry("chatcmpl-2", alice)]


def test_an_unknown_status_is_refused(ledger, key_ids):
    with pytest.raises(ValueError, match="status 'lost'"):
        ledger.record(entry("x", key_ids[0], status="lost"))


def test_query_filters_pages_and_totals_exactly(ledger, key_ids):
    alice, bob = key_ids
    for i in range(5):
        ledger.record(entry(f"cmpl-{i}", alice, minute=i, model="m/a" if i % 2 else "m/b",
                            cost=10 ** 12 // 3 + i))
    ledger.record(entry("cmpl-bob", bob, minute=2, cost=7))
    everything = ledger.query(alice)
    assert [e.id for e in everything.data] == [f"cmpl-{i}" for i in range(5)]
    assert everything.total_cost_pico == 5 * (10 ** 12 // 3) + 10 and not everything.has_more
    first = ledger.query(alice, limit=2)
    assert ([e.id for e in first.data], first.has_more) == (["cmpl-0", "cmpl-1"], True)
    assert first.total_cost_pico == everything.total_cost_pico  # the whole selection
    second = ledger.query(alice, limit=2, after="cmpl-1")
    assert [e.id for e in second.data] == ["cmpl-2", "cmpl-3"]
    last = ledger.query(alice, limit=2, after="cmpl-3")
    assert ([e.id for e in last.data], last.has_more) == (["cmpl-4"], False)
    window = ledger.query(alice, start=T0 + timedelta(minutes=1), end=T0 + timedelta(minutes=3))
    assert [e.id for e in window.data] == ["cmpl-1", "cmpl-2"]
    assert [e.id for e in ledger.query(alice, model="m/a").data] == ["cmpl-1", "cmpl-3"]
    assert [e.id for e in ledger.query(None).data] == [
        "cmpl-0", "cmpl-1", "cmpl-2", "cmpl-bob", "cmpl-3", "cmpl-4"]
    assert (ledger.spend(alice), ledger.spend(bob)) == (everything.total_cost_pico, 7)


def test_a_page_cursor_never_points_into_another_keys_records(ledger, key_ids):
    alice, bob = key_ids
    ledger.record(entry("cmpl-bob", bob))
    with pytest.raises(KeyError):
        ledger.query(alice, after="cmpl-bob")
    with pytest.raises(KeyError):
        ledger.query(alice, after="cmpl-missing")
    with pytest.raises(ValueError, match="limit"):
        ledger.query(alice, limit=1001)


def test_totals_per_key_model_and_utc_day_are_exact(ledger, key_ids):
    alice, bob = key_ids
    ledger.record(entry("a1", alice, minute=0, model="m/a", cost=10 ** 15 + 1))
    ledger.record(entry("a2", alice, minute=12 * 60 + 1, model="m/b", cost=2))  # the next day
    ledger.record(entry("b1", bob, minute=5, model="m/a", cost=3))
    totals = ledger.totals()
    assert totals.by_key == {alice: 10 ** 15 + 3, bob: 3}
    assert totals.by_model == {"m/a": 10 ** 15 + 4, "m/b": 2}
    assert totals.by_day == {"2026-12-01": 10 ** 15 + 4, "2026-12-02": 2}
    assert ledger.totals(key_id=bob).by_key == {bob: 3}
    assert ledger.totals(model="m/b", start=T0 + timedelta(hours=1)).by_day == {"2026-12-02": 2}


def test_daily_groups_requests_tokens_and_cost_per_utc_day_key_and_model(ledger, key_ids):
    from tokenmill.platform.ledger import UsageGroup

    alice, bob = key_ids
    ledger.record(entry("a1", alice, minute=0, model="m/a", cost=10 ** 15 + 1))
    ledger.record(entry("a2", alice, minute=30, model="m/a", cost=4, status="aborted"))
    ledger.record(entry("a3", alice, minute=12 * 60 + 1, model="m/b", cost=2))  # the next day
    ledger.record(entry("b1", bob, minute=5, model="m/a", cost=3))
    assert ledger.daily(alice) == [
        UsageGroup("2026-12-01", alice, "m/a", 2, 20, 4, 10, 10 ** 15 + 5),
        UsageGroup("2026-12-02", alice, "m/b", 1, 10, 2, 5, 2)]
    assert ledger.daily() == [
        UsageGroup("2026-12-01", alice, "m/a", 2, 20, 4, 10, 10 ** 15 + 5),
        UsageGroup("2026-12-01", bob, "m/a", 1, 10, 2, 5, 3),
        UsageGroup("2026-12-02", alice, "m/b", 1, 10, 2, 5, 2)]
    assert ledger.daily(alice, start=T0 + timedelta(hours=1)) == [
        UsageGroup("2026-12-02", alice, "m/b", 1, 10, 2, 5, 2)]
    assert ledger.daily(bob, end=T0) == []


def test_recent_lists_the_newest_records_first_for_one_key_or_all(ledger, key_ids):
    alice, bob = key_ids
    for minute, rid, key in [(0, "a1", alice), (1, "b1", bob), (2, "a2", alice), (2, "a3", alice)]:
        ledger.record(entry(rid, key, minute=minute))
    assert [e.id for e in ledger.recent(alice)] == ["a3", "a2", "a1"]  # ties: by id, descending
    assert [e.id for e in ledger.recent(alice, limit=2)] == ["a3", "a2"]
    assert [e.id for e in ledger.recent(limit=3)] == ["a3", "a2", "b1"]
    with pytest.raises(ValueError):
        ledger.recent(alice, limit=0)
