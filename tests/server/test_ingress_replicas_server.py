"""`tokenmill serve --ingress-replicas 2 --replicas 1`: the whole server as one Ray Serve
application on a local Ray, two ingress replicas (the API, behind Ray Serve's HTTP proxy) over one
PostgreSQL ledger and one Redis, in front of one engine replica. The same greedy output as one
process, streamed or not; a key's limits hold across both ingress replicas exactly; one ledger
row per delivered response; hanging up through the proxy aborts the engine request.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from server_live import (MAX_MODEL_LEN, MODEL_ID, descendants_running, hang_up_streams, new_key,
                         redis_prefix, start_server, stop_server)

PROMPTS = ["Name a colour.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def application(default_model_path, tmp_path_factory, new_pg_database):
    with redis_prefix() as prefix:
        db = new_pg_database()
        server = start_server(tmp_path_factory.mktemp("ingress"), [
            "--model", str(default_model_path), "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-gib", "0.25", "--replicas", "1", "--replica-threads", "1",
            "--ingress-replicas", "2", "--db", db, "--redis", "redis://127.0.0.1:6379/0",
            "--redis-prefix", prefix])
        yield db, server
        stop_server(server)


def actors(server, deployment: str) -> list[psutil.Process]:
    """The replica processes of one deployment of this server's local Ray."""
    return descendants_running(server.proc.pid, f"ServeReplica:tokenmill:{deployment}")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def ingress_access_logs(server) -> list[Path]:
    """The access log of each ingress replica (Ray Serve writes one per replica, in the log
    directory of this server's local Ray, which its GCS is started with)."""
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        for part in proc.cmdline():
            if part.startswith("--log_dir="):
                logs = Path(part.removeprefix("--log_dir=")) / "serve"
                return sorted(logs.glob("replica_tokenmill_ingress_*.log"))
    raise AssertionError("no local Ray under the server")


def chat_posts(log: Path) -> int:
    return log.read_text().count("POST /v1/chat/completions")


def chat(server, key: str, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL_ID, "temperature": 0, "max_tokens": 12, **body})


def streamed_text(server, key: str, **body) -> str:
    events = []
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL_ID, "temperature": 0, "max_tokens": 12,
                            "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events)


def test_the_application_gives_one_process_greedy_output_streamed_or_not(application, server):
    _, app = application
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        one = chat(server, server.key, messages=messages)
        assert one.status_code == 200, one.text
        expected = one.json()["choices"][0]["message"]["content"]
        two = chat(app, app.key, messages=messages)
        assert two.status_code == 200, two.text
        assert two.json()["choices"][0]["message"]["content"] == expected
        assert two.json()["usage"]["completion_tokens"] == one.json()["usage"]["completion_tokens"]
        assert streamed_text(app, app.key, messages=messages) == expected


def test_bad_requests_get_openai_errors_through_the_proxy(application):
    _, app = application
    bad = chat(app, app.key, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "temperature"
    no_key = httpx.post(app.v1 + "/chat/completions", json={"model": MODEL_ID}, timeout=30)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "invalid_request_error"


def test_rpm_5_across_two_ingress_replicas_admits_exactly_5_of_12_and_bills_each_once(
        application):
    """Both ingress replicas take part (each one's access log shows some of the burst: Ray
    Serve's proxy spreads the requests), yet the key's limit holds as in one process."""
    db, app = application
    key = new_key(db, app.home, "rpm5-ingress", "--rpm", "5")
    logs = ingress_access_logs(app)
    assert len(logs) == 2
    before = {log: chat_posts(log) for log in logs}
    answers: list[httpx.Response] = []
    start = threading.Barrier(12)

    def one() -> None:
        start.wait()
        answers.append(chat(app, key, messages=[{"role": "user", "content": "Hi"}],
                            max_tokens=1))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert Counter(r.status_code for r in answers) == {200: 5, 429: 7}
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in answers)
    deadline = time.monotonic() + 30  # the replicas write their access lines as they answer
    while sum(chat_posts(log) - before[log] for log in logs) < 12:
        assert time.monotonic() < deadline, "the access logs lack requests"
        time.sleep(0.5)
    served = [chat_posts(log) - before[log] for log in logs]
    assert all(served), f"one ingress replica took the whole burst: {served}"
    rows = httpx.get(app.v1 + "/usage", headers={"Authorization": f"Bearer {key}"},
                     params={"limit": 100}, timeout=30).json()["data"]
    assert len(rows) == 5


def test_hanging_up_at_the_proxy_aborts_the_engine_request(application):
    """Three long streams dropped after their first tokens: had the engine gone on (900 tokens
    each, ignore_eos) its replica would be busy for a minute; aborted, it sits idle."""
    _, app = application
    hang_up_streams(app, 3)
    time.sleep(2)  # the cancellations cross the proxy, the ingress and the engine handle
    [engine] = actors(app, "engine-0")
    before = cpu_seconds(engine)
    time.sleep(3)
    assert cpu_seconds(engine) - before < 1.0, "the engine replica kept generating"


def test_a_killed_ingress_replica_is_replaced_and_the_other_serves_meanwhile(application):
    """SIGKILL one ingress replica: the proxy sends new requests to the living one at once (a
    request already routed to the dead one may fail, as a killed process's would) and Ray Serve
    starts a replacement."""
    _, app = application
    victim, survivor = actors(app, "ingress")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    answers = [chat(app, app.key, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
               for _ in range(6)]
    assert [r.status_code for r in answers[1:]] == [200] * 5, [r.text for r in answers]
    assert survivor.is_running()
    deadline = time.monotonic() + 120
    while len(actors(app, "ingress")) < 2:
        assert time.monotonic() < deadline, "the killed ingress replica was not replaced"
        time.sleep(1)
    deadline = time.monotonic() + 60
    while httpx.get(app.base_url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the application did not become healthy again"
        time.sleep(1)
