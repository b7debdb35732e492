"""Tensor-parallel ranks placed by Ray: `tokenmill serve --replicas 1 --tensor-parallel-size 2`
makes each engine replica a placement group of 2 bundles, the replica's actor rank 0 and a Ray
actor rank 1. It answers as one process of one rank does; a rank killed fails its replica's
requests with an OpenAI error, and Ray Serve replaces the replica, ranks and all."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest
from server.server_live import descendants_running, start_server, stop_server  # tests/ on path

pytest.importorskip("ray", reason="Ray Serve (tokenmill[scale]) is not installed")

BODY = {"temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Name three rivers."}]}


def rank_actors(server) -> list[psutil.Process]:
    return descendants_running(server.proc.pid, "TensorParallelRank")


def ask(server, model: str) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json={"model": model, **BODY}, timeout=120)


@pytest.fixture(scope="module")
def placed(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("qwen2")
    server = start_server(tmp_path_factory.mktemp("ray-tp"), [
        "--model", str(path), "--no-auth", "--kv-cache-gib", "0.01", "--max-model-len", "256",
        "--replicas", "1", "--replica-threads", "2", "--tensor-parallel-size", "2"])
    yield path, server
    stop_server(server)


def test_a_replica_of_two_ray_placed_ranks_answers_as_one_rank(placed, tmp_path):
    path, server = placed
    home = tmp_path / "one"
    home.mkdir()
    one = start_server(home, ["--model", str(path), "--no-auth", "--kv-cache-gib", "0.01",
                              "--max-model-len", "256"])
    try:
        expected = ask(one, path.name)
        assert expected.status_code == 200, expected.text
    finally:
        stop_server(one)
    reply = ask(server, path.name)
    assert reply.status_code == 200, reply.text
    assert (reply.json()["choices"][0]["message"]["content"]
            == expected.json()["choices"][0]["message"]["content"])
    assert len(rank_actors(server)) == 1  # rank 1, a Ray actor; rank 0 is the replica


def test_a_killed_rank_fails_its_replica_which_ray_serve_replaces(placed):
    path, server = placed
    [rank] = rank_actors(server)
    os.kill(rank.pid, signal.SIGKILL)
    failed = ask(server, path.name)
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "engine_unavailable"
    deadline = time.monotonic() + 180
    while True:  # the health check fails, the replica and its placement group are replaced
        assert time.monotonic() < deadline, "the replica was not replaced"
        reply = ask(server, path.name)
        if reply.status_code == 200:
            break
        assert reply.status_code == 503, reply.text
        time.sleep(2)
    [new_rank] = rank_actors(server)
    assert new_rank.pid != rank.pid
