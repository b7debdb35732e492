"""Keys in the store: create, authenticate, revoke, expire, update, spend, the old keys.json,
the `tokenmill keys` command, and concurrent writers on SQLite."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import delete, select

from tokenmill.keys_cli import add_keys_parser, keys_command, usd
from tokenmill.platform.db import ApiKey, UsageRecord
from tokenmill.platform.keys import (KeyInfo, KeyService, Principal, budget_to_pico,
                                     display_key, generate_key, hash_key)
from tokenmill.platform.store import open_store

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def keys(store, clock):
    return KeyService(store, clock)


def key_id(session, name: str) -> int:
    return session.scalar(select(ApiKey.id).where(ApiKey.name == name))


def info_id(store, name: str) -> int:
    with store.read() as session:
        return key_id(session, name)


def test_create_stores_only_the_hash_and_authenticates(keys, store):
    key, info = keys.create("alice", rpm=60, tpm=1000, budget_usd="2.5", models=["m1", "m2"],
                            expires=date(2025, 4, 1))
    assert key.startswith("sk-tm-") and len(key) == 6 + 43  # 32 random bytes, urlsafe base64
    assert info == KeyInfo("alice", display_key(key), False, 60, 1000, 2_500_000_000_000,
                           ("m1", "m2"), 0, "active", datetime(2025, 4, 1, tzinfo=timezone.utc),
                           T0, None)
    with store.read() as session:
        row = session.scalar(select(ApiKey))
        assert (row.key_hash, row.display) == (hashlib.sha256(key.encode()).hexdigest(),
                                               key[:10] + "..." + key[-4:])
    assert keys.authenticate(key) == Principal(info_id(store, "alice"), "alice", display_key(key),
                                               False, 60, 1000, 2_500_000_000_000, ("m1", "m2"),
                                               datetime(2025, 4, 1, tzinfo=timezone.utc))
    assert keys.authenticate(key + "x") is None
    assert keys.authenticate("") is None


def test_two_created_keys_differ_in_value_and_hash(keys):
    first, _ = keys.create("a")
    second, _ = keys.create("b")
    assert first != second and hash_key(first) != hash_key(second)


def test_a_taken_name_is_refused(keys):
    keys.create("alice")
    with pytest.raises(ValueError, match="a key named 'alice' already exists"):
        keys.create("alice", admin=True)
    assert [info.name for info in keys.list()] == ["alice"]


def test_bad_limits_are_refused(keys, clock):
    with pytest.raises(ValueError,
                       match="rpm must be a positive integer up to 9223372036854775807, not 0"):
        keys.create("a", rpm=0)
    with pytest.raises(ValueError, match="tpm must be a positive integer up to"):
        keys.create("a", tpm=2**63)  # no BIGINT column holds it
    with pytest.raises(ValueError, match=r"budget must be at most USD 9223372\.036854775807"):
        keys.create("a", budget_usd="9223372.036854775808")
    with pytest.raises(ValueError, match="at most 12 decimals"):
        keys.create("a", budget_usd="0.0000000000001")
    with pytest.raises(ValueError, match="already past"):
        keys.create("a", expires=date(2025, 3, 1))
    with pytest.raises(ValueError, match="non-empty name"):
        keys.create(" ")
    assert keys.list() == []


def test_budget_to_pico_is_exact():
    assert budget_to_pico("0.25") == 250_000_000_000
    assert budget_to_pico(Decimal("1.000000000001")) == 1_000_000_000_001
    assert budget_to_pico("0") == 0
    assert budget_to_pico(None) is None
    with pytest.raises(ValueError):
        budget_to_pico("-1")
    with pytest.raises(ValueError):
        budget_to_pico("five")


def test_a_revoked_key_is_refused_on_its_next_call(keys):
    key, _ = keys.create("alice")
    assert keys.authenticate(key).name == "alice"
    revoked = keys.revoke("alice")
    assert revoked.status == "revoked"
    assert keys.authenticate(key) is None
    with pytest.raises(KeyError, match="no key named 'bob'"):
        keys.revoke("bob")


def test_an_expired_key_is_refused_from_its_expiry_on(keys, clock):
    key, _ = keys.create("alice", expires=datetime(2025, 3, 1, 13, 0, tzinfo=timezone.utc))
    clock.now = datetime(2025, 3, 1, 12, 59, 59, tzinfo=timezone.utc)
    assert keys.authenticate(key).name == "alice"
    clock.now = datetime(2025, 3, 1, 13, 0, tzinfo=timezone.utc)
    assert keys.authenticate(key) is None
    assert [info.status for info in keys.list()] == ["expired"]


def test_a_deleted_key_is_refused_on_its_next_call(keys, store):
    key, _ = keys.create("alice")
    assert keys.authenticate(key) is not None
    with store.write() as session:
        session.execute(delete(ApiKey))
    assert keys.authenticate(key) is None


def test_last_used_is_written_at_most_once_a_minute(keys, clock):
    key, _ = keys.create("alice")
    assert keys.list()[0].last_used_at is None
    keys.authenticate(key)
    clock.now = T0 + timedelta(seconds=59)
    keys.authenticate(key)
    assert keys.list()[0].last_used_at == T0
    clock.now = T0 + timedelta(seconds=60)
    keys.authenticate(key)
    assert keys.list()[0].last_used_at == T0 + timedelta(seconds=60)


def test_update_changes_only_the_given_limits(keys):
    key, _ = keys.create("alice", rpm=10, tpm=100, budget_usd="1", models=["m1"])
    info = keys.update("alice", rpm=20, budget_usd=None)
    assert (info.rpm, info.tpm, info.budget_pico, info.models) == (20, 100, None, ("m1",))
    info = keys.update("alice", tpm=None, models=["m2", "m3"], budget_usd="0.5")
    assert (info.rpm, info.tpm, info.budget_pico, info.models) == (20, None, 500_000_000_000,
                                                                  ("m2", "m3"))
    principal = keys.authenticate(key)
    assert (principal.rpm, principal.tpm, principal.budget_pico, principal.models) == (
        20, None, 500_000_000_000, ("m2", "m3"))
    with pytest.raises(KeyError):
        keys.update("bob", rpm=1)


def test_list_shows_the_spend_of_each_key(keys, store, clock):
    keys.create("a")
    clock.now = T0 + timedelta(seconds=1)
    keys.create("b")
    clock.now = T0 + timedelta(seconds=2)
    keys.create("c")
    costs = [("a", 3_000_000_000_001), ("a", 5), ("b", 7)]
    with store.write() as session:
        for i, (name, cost) in enumerate(costs):
            session.add(UsageRecord(id=f"chatcmpl-{i}", key_id=key_id(session, name),
                                    model="m", prompt_tokens=1, cached_tokens=0,
                                    completion_tokens=1, cost_pico=cost, status="completed",
                                    finish_reason="stop", created_at=T0, finished_at=T0))
    assert [(info.name, info.spend_pico) for info in keys.list()] == [
        ("a", 3_000_000_000_006), ("b", 7), ("c", 0)]


def test_has_admin_counts_only_active_admin_keys(keys):
    assert not keys.has_admin()
    keys.create("user")
    assert not keys.has_admin()
    keys.create("root", admin=True)
    assert keys.has_admin()
    keys.revoke("root")
    assert not keys.has_admin()


def write_old_keys_json(path, *keys: tuple[str, bool]) -> dict[str, str]:
    """A keys.json as tokenmill 0.1 wrote it (a list of {name, key_hash, display, admin,
    created}); returns name -> the key in clear."""
    made = {name: generate_key() for name, _ in keys}
    path.write_text(json.dumps([
        {"name": name, "key_hash": hash_key(made[name]), "display": display_key(made[name]),
         "admin": admin, "created": 1700000000 + i} for i, (name, admin) in enumerate(keys)]))
    return made


def test_import_json_keeps_old_keys_working_and_runs_once(keys, tmp_path):
    made = write_old_keys_json(tmp_path / "keys.json", ("admin", True), ("user", False))
    admin_key, user_key = made["admin"], made["user"]
    created = {"admin": 1700000000, "user": 1700000001}
    assert keys.import_json(tmp_path / "keys.json") == 2
    assert keys.import_json(tmp_path / "keys.json") == 0
    admin, user = keys.authenticate(admin_key), keys.authenticate(user_key)
    assert (admin.name, admin.admin, admin.display) == ("admin", True, display_key(admin_key))
    assert (user.name, user.admin, user.display) == ("user", False, display_key(user_key))
    assert [(i.name, i.created_at) for i in keys.list()] == [
        (name, datetime.fromtimestamp(created[name], timezone.utc)) for name in ("admin", "user")]
    assert keys.import_json(tmp_path / "missing.json") == 0


def test_import_json_refuses_a_name_taken_by_another_key(keys, tmp_path):
    write_old_keys_json(tmp_path / "keys.json", ("zed", False), ("alice", False))
    keys.create("alice")
    with pytest.raises(ValueError, match="key 'alice' is already taken"):
        keys.import_json(tmp_path / "keys.json")
    assert [info.name for info in keys.list()] == ["alice"]


# ---- tokenmill keys ------------------------------------------------------------------------------

def run_keys(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", *argv])
    assert args.run is keys_command
    return keys_command(args)


def test_keys_create_prints_the_key_alone_on_its_last_line(store_url, capsys):
    assert run_keys(["create", "--name", "bob", "--rpm", "5", "--budget", "1.5", "--models",
                     "m1,m2", "--expires", "2099-01-02", "--admin", "--db", store_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[-1]
    assert lines[:-1] == [f"created admin key 'bob' ({display_key(key)}): rpm 5, tpm -, budget "
                          "1.50, models m1,m2, expires 2099-01-02",
                          "the key is shown only now; store it safely:"]
    store = open_store(store_url)
    try:
        principal = KeyService(store).authenticate(key)
        assert (principal.name, principal.admin, principal.rpm, principal.tpm,
                principal.budget_pico, principal.models, principal.expires_at) == (
            "bob", True, 5, None, 1_500_000_000_000, ("m1", "m2"),
            datetime(2099, 1, 2, tzinfo=timezone.utc))
        with store.read() as session:
            assert session.scalar(select(ApiKey.key_hash)) == hash_key(key)
    finally:
        store.close()


def test_keys_list_and_revoke(store_url, capsys, monkeypatch):
    monkeypatch.setenv("TOKENMILL_DB", store_url)  # no --db: the environment names the store
    assert run_keys(["create", "--name", "alice", "--tpm", "100"]) == 0
    alice = capsys.readouterr().out.splitlines()[-1]
    assert run_keys(["create", "--name", "bob", "--budget", "0.000001"]) == 0
    bob = capsys.readouterr().out.splitlines()[-1]
    assert run_keys(["revoke", "--name", "bob"]) == 0
    assert capsys.readouterr().out == f"revoked key 'bob' ({display_key(bob)})\n"
    assert run_keys(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    da, db = display_key(alice), display_key(bob)
    assert out == [
        f"NAME   KEY{' ' * (len(da) - 3)}  RPM  TPM  BUDGET USD  SPEND USD  MODELS  STATUS   "
        "LAST USED",
        f"alice  {da}  -    100  -           0.00       all     active   -",
        f"bob    {db}  -    -    0.000001    0.00       all     revoked  -",
    ]
    store = open_store(store_url)
    try:
        service = KeyService(store)
        assert service.authenticate(bob) is None
        assert service.authenticate(alice).name == "alice"
    finally:
        store.close()


def test_keys_errors_are_one_line_and_exit_2(store_url, capsys):
    assert run_keys(["create", "--name", "a", "--db", store_url]) == 0
    capsys.readouterr()
    assert run_keys(["create", "--name", "a", "--db", store_url]) == 2
    assert capsys.readouterr() == ("", "tokenmill keys: error: a key named 'a' already exists\n")
    assert run_keys(["revoke", "--name", "zz", "--db", store_url]) == 2
    assert capsys.readouterr().err == "tokenmill keys: error: no key named 'zz'\n"
    assert run_keys(["create", "--name", "b", "--expires", "soon", "--db", store_url]) == 2
    assert capsys.readouterr().err == ("tokenmill keys: error: --expires must be a date "
                                       "YYYY-MM-DD, not 'soon'\n")
    assert run_keys(["list", "--db", "postgresql://u:pw@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmill keys: error: store postgresql+psycopg://u:***@127.0.0.1:1/x "
                          "unavailable: ") and err.count("\n") == 1


def test_usd_is_exact():
    assert [usd(0), usd(1_500_000_000_000), usd(1), usd(100 * 10**12)] == [
        "0.00", "1.50", "0.000000000001", "100.00"]


# ---- concurrency ---------------------------------------------------------------------------------

def test_concurrent_writers_on_sqlite_never_hit_database_is_locked(tmp_path):
    """8 threads, each with its own store (own connections, as separate processes would have),
    open a fresh file at once (racing migrations) and create and use 5 keys each."""
    url = f"sqlite:///{tmp_path / 'tokenmill.db'}"
    start, errors, created = threading.Barrier(8), [], []

    def worker(n: int) -> None:
        try:
            start.wait()
            store = open_store(url)
            try:
                service = KeyService(store)
                for i in range(5):
                    key, _ = service.create(f"w{n}-{i}")
                    assert service.authenticate(key).name == f"w{n}-{i}"
                    created.append(key)
            finally:
                store.close()
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = open_store(url)
    try:
        assert len(KeyService(store).list()) == 40 == len(set(created))
    finally:
        store.close()
