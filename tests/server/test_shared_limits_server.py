"""Two ingress replicas (two real `tokenmill serve` processes) over one PostgreSQL ledger and one
Redis (`--redis`): a key's limits hold across them exactly as in one process, and the ledger has
one row per delivered response whichever replica served it.

Kept cheap for a 2-core CPU: the default model, one token per request.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from server_live import MODEL_ID, new_key, redis_prefix, start_server, stop_server


@pytest.fixture(scope="module")
def replicas(default_model_path, tmp_path_factory, new_pg_database):
    with redis_prefix() as prefix:
        db = new_pg_database()
        shared = ["--model", str(default_model_path), "--max-model-len", "512", "--kv-cache-gib",
                  "0.25", "--db", db, "--redis", "redis://127.0.0.1:6379/0", "--redis-prefix",
                  prefix]
        servers = [start_server(tmp_path_factory.mktemp(f"replica{i}"), shared)
                   for i in range(2)]
        yield db, servers
        for server in servers:
            stop_server(server)


def chat(server, key: str) -> httpx.Response:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, "temperature": 0}
    return httpx.post(server.v1 + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_rpm_5_across_two_replicas_admits_exactly_5_of_12_simultaneous_requests(replicas):
    db, servers = replicas
    key = new_key(db, servers[0].home, "rpm5-shared", "--rpm", "5")
    answers: list[httpx.Response] = []
    start = threading.Barrier(12)

    def one(i: int) -> None:
        start.wait()
        answers.append(chat(servers[i % 2], key))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    # 6 requests each: limits kept per process would admit 5 on each replica, 10 in all.
    assert Counter(r.status_code for r in answers) == {200: 5, 429: 7}
    for r in answers:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1
    # One ledger row per delivered response, seen alike from either replica.
    for server in servers:
        rows = httpx.get(server.v1 + "/usage", headers={"Authorization": f"Bearer {key}"},
                         params={"limit": 100}, timeout=30).json()["data"]
        assert len(rows) == 5

