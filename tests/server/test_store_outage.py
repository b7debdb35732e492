"""The server through a store outage: 503s when failing closed (the default), and with
--ledger-fail-open keys seen before the outage served, records spooled and replayed once the
store is back; either way the outage is logged once. The outage is real: the SQLite store's
directory moves away (and back) with its connections dropped, as when a volume goes."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server_fakes import FakeEngine, served
from tokenmill.platform.keys import KeyService
from tokenmill.platform.ledger import Ledger
from tokenmill.platform.spool import UsageSpool
from tokenmill.platform.store import Store, open_store
from tokenmill.server.app import build_app
from tokenmill.server.state import ServerSettings

MODEL = "fake-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir):
    store = open_store(f"sqlite:///{store_dir / 'tokenmill.db'}")
    yield store
    store.close()


@contextmanager
def outage(store: Store, store_dir: Path):
    """The store unreachable inside the block: its directory gone, its pooled connections
    closed (new ones cannot open the file)."""
    away = store_dir.with_name("store-away")
    store_dir.rename(away)
    store.engine.dispose()
    try:
        yield
    finally:
        away.rename(store_dir)
        store.engine.dispose()


def client_of(store: Store, spool: UsageSpool | None) -> httpx.AsyncClient:
    settings = ServerSettings(keys=KeyService(store), ledger=Ledger(store), spool=spool)
    app = build_app([served(FakeEngine(), MODEL)], settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "store is" in r.getMessage()]


async def test_failing_closed_refuses_with_503_and_logs_the_outage_once(store, store_dir,
                                                                        caplog):
    caplog.set_level(logging.INFO)
    key, _ = KeyService(store).create("alice")
    async with client_of(store, None) as client:
        assert (await client.post("/v1/chat/completions", json=BODY,
                                  headers=bearer(key))).status_code == 200
        with outage(store, store_dir):
            for _ in range(3):
                r = await client.post("/v1/chat/completions", json=BODY, headers=bearer(key))
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "store_unavailable"
                assert r.json()["error"]["type"] == "server_error"
        r = await client.post("/v1/chat/completions", json=BODY, headers=bearer(key))
        assert r.status_code == 200
    [down, back] = outage_lines(caplog)
    assert "unreachable, refusing requests" in down and back == "the store is reachable again"


async def test_failing_open_serves_known_keys_spools_their_records_and_replays_them(
        store, store_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    keys, ledger = KeyService(store), Ledger(store)
    known, _ = keys.create("known")
    unseen, _ = keys.create("unseen")
    spool = UsageSpool(tmp_path / "usage-spool.jsonl")
    async with client_of(store, spool) as client:
        before = await client.post("/v1/chat/completions", json=BODY, headers=bearer(known))
        with outage(store, store_dir):
            during = [await client.post("/v1/chat/completions", json=BODY, headers=bearer(known))
                      for _ in range(2)]
            assert [r.status_code for r in during] == [200, 200]
            # A key never authenticated by this process has nothing to vouch for it.
            r = await client.post("/v1/chat/completions", json=BODY, headers=bearer(unseen))
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert spool.pending()
        # The store is back: the next record written brings the spooled ones with it.
        after = await client.post("/v1/chat/completions", json=BODY, headers=bearer(known))
    assert not spool.pending()
    ids = [r.json()["id"] for r in (before, *during, after)]
    page = ledger.query(keys.ids_by_name()["known"])
    assert sorted(entry.id for entry in page.data) == sorted(ids)
    costs = [round(r.json()["usage"]["estimated_cost"] * 1e12) for r in (before, *during, after)]
    assert page.total_cost_pico == sum(costs)
    [down, back] = outage_lines(caplog)
    assert f"usage records spooled to {spool.path}" in down
    assert back == "the store is reachable again"
