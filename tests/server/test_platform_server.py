"""The platform through a real `tokenmill serve`, once over SQLite and once over PostgreSQL: keys
made by the CLI, 401s and 403s with OpenAI's bodies, usage rows that add up to what the responses
reported, limits and budgets enforced under concurrency, and a ledger that survives a restart and
a `kill -9` under load. The PostgreSQL server runs with --ledger-fail-open and goes through a
real outage (its database refusing connections).

Kept cheap for a 2-core CPU: the default model, max_tokens of a few tokens, temperature 0. The
restart and kill tests run last in each module instance because they replace the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from server_live import MODEL_ID, Server, start_server, stop_server, tokenmill_command

MESSAGES = [{"role": "user", "content": "Name a colour."}]
PRICE_IN, PRICE_OUT = 20_000, 40_000  # the default model's catalog price, micro-USD per 1M tokens


@dataclass
class Platform:
    backend: str  # sqlite | postgresql
    db: str  # the store's URL, as given to --db
    home: Path
    args: list[str]  # `tokenmill serve` arguments
    server: Server

    def keys(self, *args: str) -> str:
        """`tokenmill keys ARGS --db DB`; its stdout."""
        done = subprocess.run(tokenmill_command() + ["keys", *args, "--db", self.db],
                              env=dict(os.environ, TOKENMILL_HOME=str(self.home)), check=True,
                              capture_output=True, text=True, timeout=120)
        return done.stdout

    def new_key(self, name: str, *options: str) -> str:
        return self.keys("create", "--name", name, *options).splitlines()[-1]

    def restart(self) -> None:
        """Stop the server (SIGTERM, drained; nothing to do if it was killed) and start it again
        on the same store."""
        stop_server(self.server)
        self.server = start_server(self.home, self.args)


def run_sql(db: str, statement: str, **params) -> None:
    """One statement, autocommitted, on the store at `db` (the test's own connection)."""
    engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(statement), params)
    engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def platform(request, default_model_path, tmp_path_factory):
    home = tmp_path_factory.mktemp(f"platform_{request.param}")
    if request.param == "sqlite":
        db, extra = f"sqlite:///{home / 'tokenmill.db'}", []
    else:
        db, extra = request.getfixturevalue("new_pg_database")(), ["--ledger-fail-open"]
    args = ["--model", str(default_model_path), "--max-model-len", "512", "--kv-cache-gib",
            "0.25", "--db", db, "--drain-timeout", "10", *extra]
    running = Platform(request.param, db, home, args, start_server(home, args))
    yield running
    stop_server(running.server)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(platform: Platform, key: str, **body) -> httpx.Response:
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(platform.server.v1 + "/chat/completions", json=body, headers=auth(key),
                      timeout=120)


def usage(platform: Platform, key: str, **params) -> dict:
    r = httpx.get(platform.server.v1 + "/usage", headers=auth(key),
                  params={"limit": 1000, **params}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def sse_payloads(r: httpx.Response) -> list:
    lines = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def pico(usd: float) -> int:
    return round(usd * 1e12)


# ---- keys ----------------------------------------------------------------------------------------

def test_missing_malformed_wrong_revoked_and_expired_keys_get_401_with_openais_body(platform):
    v1 = platform.server.v1
    revoked = platform.new_key("to-revoke")
    expired = platform.new_key("to-expire", "--expires", "2099-01-01")
    for key in (revoked, expired):  # both work until they are revoked or expire
        assert httpx.get(v1 + "/models", headers=auth(key)).status_code == 200
    platform.keys("revoke", "--name", "to-revoke")
    # The key's expiry passes (the CLI takes only future dates; the store is the real one).
    run_sql(platform.db, "UPDATE api_keys SET expires_at = :past WHERE name = 'to-expire'",
                 past="2020-01-01 00:00:00+00:00")
    refusals = {"missing": {}, "not bearer": {"Authorization": f"Basic {revoked}"},
                "empty bearer": {"Authorization": "Bearer"}, "wrong": auth("sk-tm-" + "x" * 43),
                "revoked": auth(revoked), "expired": auth(expired)}
    for case, headers in refusals.items():
        for method, path in (("GET", "/models"), ("POST", "/chat/completions")):
            r = httpx.request(method, v1 + path, headers=headers, json={}, timeout=30)
            error = assert_openai_error(r, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error", case
            assert revoked not in error["message"] and expired not in error["message"]


def test_admin_routes_are_403_to_a_user_key(platform):
    user = platform.new_key("plain-user")
    base = platform.server.base_url
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("PATCH", "/admin/keys/plain-user"), ("DELETE", "/admin/keys/plain-user"),
                         ("GET", "/admin/usage"), ("GET", "/admin/usage/summary")):
        r = httpx.request(method, base + path, headers=auth(user), json={"name": "x"}, timeout=30)
        assert_openai_error(r, 403, "permission_denied")
    r = httpx.get(base + "/admin/keys", headers=auth(platform.server.key), timeout=30)
    assert "plain-user" in [k["name"] for k in r.json()["data"]]


# ---- the ledger ----------------------------------------------------------------------------------

def test_usage_rows_add_up_to_what_the_responses_reported_and_stay_with_their_key(platform):
    alice, bob = platform.new_key("alice"), platform.new_key("bob")
    plain = chat(platform, alice)
    streamed = httpx.post(platform.server.v1 + "/completions", headers=auth(alice), timeout=120,
                          json={"model": MODEL_ID, "prompt": ["Red", "Blue"], "n": 2,
                                "max_tokens": 3, "stream": True,
                                "stream_options": {"include_usage": True}})
    chat_stream = chat(platform, alice, stream=True, stream_options={"include_usage": True})
    bobs = chat(platform, bob, max_tokens=2)
    assert {r.status_code for r in (plain, streamed, chat_stream, bobs)} == {200}
    reported = {plain.json()["id"]: plain.json()["usage"], bobs.json()["id"]: bobs.json()["usage"]}
    for r in (streamed, chat_stream):
        chunks = sse_payloads(r)
        reported[chunks[0]["id"]] = chunks[-1]["usage"]

    mine = usage(platform, alice)
    rows = {row["id"]: row for row in mine["data"]}
    assert set(rows) == set(reported) - {bobs.json()["id"]}  # bob's row is not alice's
    for rid, row in rows.items():
        used = reported[rid]
        assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
            used["prompt_tokens"], used["completion_tokens"],
            used["prompt_tokens_details"]["cached_tokens"])
        assert pico(row["cost"]) == pico(used["estimated_cost"])
        assert pico(row["cost"]) == (row["prompt_tokens"] * PRICE_IN
                                     + row["completion_tokens"] * PRICE_OUT)
        assert row["status"] == "completed" and row["model"] == MODEL_ID
    assert pico(mine["total_cost"]) == sum(pico(row["cost"]) for row in rows.values())
    [bobs_row] = usage(platform, bob)["data"]
    assert bobs_row["id"] == bobs.json()["id"]


def test_the_usage_summary_adds_up_the_keys_own_records_per_day_and_model(platform):
    carol = platform.new_key("carol", "--rpm", "100", "--budget", "2.5")
    done = [chat(platform, carol) for _ in range(2)] + [chat(platform, platform.server.key)]
    assert {r.status_code for r in done} == {200}
    r = httpx.get(platform.server.v1 + "/usage/summary", headers=auth(carol), timeout=30)
    assert r.status_code == 200, r.text
    summary, rows = r.json(), usage(platform, carol)["data"]
    [key] = summary["keys"]
    assert (key["name"], key["rpm"], key["budget"]) == ("carol", 100, 2.5)
    spent = sum(pico(row["cost"]) for row in rows)
    assert pico(key["spend"]) == spent and pico(key["remaining_budget"]) == pico(2.5) - spent
    [day] = summary["days"]  # two requests today, one model
    assert (day["key"], day["model"], day["requests"]) == ("carol", MODEL_ID, 2)
    assert (day["prompt_tokens"], day["completion_tokens"]) == (
        sum(row["prompt_tokens"] for row in rows), sum(row["completion_tokens"] for row in rows))
    assert pico(day["cost"]) == pico(summary["total_cost"]) == spent
    assert [rec["id"] for rec in summary["recent"]] == [row["id"] for row in reversed(rows)]

    r = httpx.get(platform.server.base_url + "/admin/usage/summary",
                  headers=auth(platform.server.key), timeout=30)
    assert r.status_code == 200, r.text
    every = r.json()
    assert {"carol", "admin"} <= {k["name"] for k in every["keys"]}
    assert {d["key"] for d in every["days"]} >= {"carol", "admin"}
    assert done[-1].json()["id"] in {rec["id"] for rec in every["recent"]}
    r = httpx.get(platform.server.v1 + "/usage/summary", headers=auth(carol),
                  params={"start": "yesterday"}, timeout=30)
    assert_openai_error(r, 400, "invalid_value")


def test_a_stream_the_client_abandons_leaves_one_aborted_record_of_what_was_made(platform):
    key = platform.new_key("abandoner")
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 200, "min_tokens": 200,
            "stream": True}
    with httpx.stream("POST", platform.server.v1 + "/chat/completions", json=body,
                      headers=auth(key), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":""' not in line:
                request_id = json.loads(line[6:])["id"]
                break  # hang up after the first generated text
    deadline = time.monotonic() + 30
    while not (records := usage(platform, key)["data"]) and time.monotonic() < deadline:
        time.sleep(0.1)  # the abort and its record land after the hang-up
    [record] = records
    assert record["id"] == request_id and record["status"] == "aborted"
    assert 1 <= record["completion_tokens"] < 200
    assert pico(record["cost"]) == (record["prompt_tokens"] * PRICE_IN
                                    + record["completion_tokens"] * PRICE_OUT)


# ---- limits and budgets --------------------------------------------------------------------------

def simultaneous(platform: Platform, key: str, count: int, **body) -> list[httpx.Response]:
    """`count` chat requests released at the same moment from as many threads."""
    barrier = threading.Barrier(count)
    answers: list[httpx.Response] = [None] * count

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = chat(platform, key, **body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


def test_of_12_simultaneous_requests_against_rpm_5_exactly_5_succeed(platform):
    key = platform.new_key("rpm5", "--rpm", "5")
    answers = simultaneous(platform, key, 12, max_tokens=1)
    assert Counter(r.status_code for r in answers) == {200: 5, 429: 7}
    for r in answers:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        if r.status_code == 429:
            assert_openai_error(r, 429, "rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1
    assert len(usage(platform, key)["data"]) == 5


def test_of_12_simultaneous_requests_against_a_tpm_for_5_exactly_5_succeed(platform):
    probe = chat(platform, platform.server.key, max_tokens=1).json()["usage"]["prompt_tokens"]
    reserved = probe + 3  # each request reserves its prompt plus max_tokens=3
    key = platform.new_key("tpm5", "--tpm", str(5 * reserved))
    answers = simultaneous(platform, key, 12, max_tokens=3)
    assert Counter(r.status_code for r in answers) == {200: 5, 429: 7}
    for r in answers:
        assert r.headers["x-ratelimit-limit-tokens"] == str(5 * reserved)
        if r.status_code == 429:
            assert_openai_error(r, 429, "rate_limit_exceeded")


def test_a_tiny_budget_gives_one_success_then_insufficient_quota(platform):
    key = platform.new_key("poor", "--budget", "0.000000000001")  # one picodollar
    assert chat(platform, key, max_tokens=1).status_code == 200
    for _ in range(2):
        r = chat(platform, key, max_tokens=1)
        assert_openai_error(r, 429, "insufficient_quota")
        assert "retry-after" not in r.headers
    assert len(usage(platform, key)["data"]) == 1


# ---- outages, restarts and crashes (these replace the server: last) ------------------------------

def test_failing_open_serves_a_known_key_through_an_outage_and_bills_it_after(platform):
    if platform.backend != "postgresql":
        pytest.skip("the outage is made with PostgreSQL's ALLOW_CONNECTIONS")
    key = platform.new_key("through-outage")
    before = chat(platform, key)
    assert before.status_code == 200
    server_db, name = platform.db.rsplit("/", 1)
    admin_db = server_db + "/test"  # another database: its connections are not refused
    run_sql(admin_db, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        run_sql(admin_db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()", name=name)
        during = [chat(platform, key) for _ in range(2)]
        assert [r.status_code for r in during] == [200, 200]
        r = httpx.get(platform.server.v1 + "/usage", headers=auth(key), timeout=30)
        assert_openai_error(r, 503, "store_unavailable")  # nothing to read the ledger from
    finally:
        run_sql(admin_db, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    after = chat(platform, key)  # its record brings the spooled ones with it
    ids = {r.json()["id"] for r in (before, *during, after)}
    assert {row["id"] for row in usage(platform, key)["data"]} == ids
    log = platform.server.output()
    assert log.count("the store is unreachable, serving on") == 1
    assert log.count("the store is reachable again") == 1


def test_the_ledger_and_the_keys_survive_a_restart(platform):
    key = platform.new_key("durable")
    answer = chat(platform, key)
    before = usage(platform, key)
    platform.restart()
    assert usage(platform, key) == before
    assert before["data"][0]["id"] == answer.json()["id"]


def test_kill_9_under_load_leaves_one_row_for_every_response_received(platform):
    key = platform.new_key("under-load")
    received: list[str] = []  # ids of responses whose last byte reached the client
    lock, stop = threading.Lock(), threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(timeout=60, headers=auth(key)) as http:
            for turn in range(1000):
                if stop.is_set():
                    return
                stream = (worker + turn) % 2 == 1
                body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 6,
                        "stream": stream}
                try:
                    r = http.post(platform.server.v1 + "/chat/completions", json=body)
                    if r.status_code != 200:
                        continue
                    rid = sse_payloads(r)[0]["id"] if stream else r.json()["id"]
                except (httpx.HTTPError, ValueError, AssertionError, IndexError):
                    return  # the server died under this request: no response was received
                with lock:
                    received.append(rid)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 240
    while len(received) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    platform.server.proc.kill()  # SIGKILL while the six clients keep sending
    platform.server.proc.wait()
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
    platform.restart()
    assert len(received) >= 12
    rows = [row["id"] for row in usage(platform, key)["data"]]
    assert len(rows) == len(set(rows))  # no id twice
    assert set(received) <= set(rows)  # every response received was billed
    assert len(set(received)) == len(received)
