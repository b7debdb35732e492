"""The bench's client and runner against a scripted OpenAI-style server on loopback (uvicorn in a
thread): what it counts from a stream with and without usage, how it reports errors, and that
levels run interleaved across targets. tests/bench/test_bench_live.py runs it against a real
`tokenmill serve`."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tokenmill.bench.client import Target, base_url, resolve_target, stream_chat
from tokenmill.bench.runner import Level, run_all
from tokenmill.bench.workload import BenchRequest

REQUEST = BenchRequest(({"role": "user", "content": "hi"},), 1, 3)
SEEN: list[dict] = []  # the bodies the scripted server received


def sse(*payloads) -> str:
    return "".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads)


def delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


async def chat(request: Request):
    body = await request.json()
    SEEN.append(body)
    script = body["messages"][0]["content"]
    if script == "refuse":
        return JSONResponse({"error": {"message": "Rate limit reached", "type": "x",
                                       "param": None, "code": "rate_limit_exceeded"}}, 429)
    if script == "no-usage":  # a server that ignores stream_options: chunks are counted
        return StreamingResponse(iter([sse(delta("a"), delta("b"), "[DONE]")]),
                                 media_type="text/event-stream")
    if script == "no-done":  # cut off: the last chunk, then nothing
        return StreamingResponse(iter([sse(delta("a"))]), media_type="text/event-stream")
    if script == "odd-shape":  # valid JSON that is not a chunk
        return StreamingResponse(iter([sse(delta("a"), 5, "[DONE]")]),
                                 media_type="text/event-stream")
    if script == "broken":
        return StreamingResponse(iter([sse(delta("a"), {"error": {"message": "engine died"}})]),
                                 media_type="text/event-stream")
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    return StreamingResponse(iter([sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
                                       delta("x"), delta("yz"), usage, "[DONE]")]),
                             media_type="text/event-stream")


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "scripted-model"}, {"id": "other"}]})


@pytest.fixture(scope="module")
def server_url():
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the scripted server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def run(coro):
    return asyncio.run(coro)


async def one(url: str, content: str):
    target = Target("t", base_url(url), "m")
    async with httpx.AsyncClient() as client:
        return await stream_chat(client, target, BenchRequest(
            ({"role": "user", "content": content},), 1, 3))


def test_a_stream_is_timed_and_counted_by_the_servers_usage(server_url):
    SEEN.clear()
    result = run(one(server_url, "ok"))
    assert result.ok and result.error is None
    assert (result.prompt_tokens, result.output_tokens) == (7, 3)  # usage, not the 2 chunks
    assert len(result.chunk_times) == 2 and result.ttft == result.chunk_times[0]
    assert result.latency >= result.chunk_times[-1]
    assert SEEN[0] == {"model": "m", "messages": [{"role": "user", "content": "ok"}],
                       "max_tokens": 3, "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}


def test_without_usage_each_content_chunk_counts_as_a_token(server_url):
    result = run(one(server_url, "no-usage"))
    assert result.ok and result.output_tokens == 2 and result.prompt_tokens == 0


def test_refusals_and_broken_streams_are_errors_with_the_servers_message(server_url):
    refused = run(one(server_url, "refuse"))
    assert not refused.ok and refused.error == "HTTP 429: Rate limit reached"
    broken = run(one(server_url, "broken"))
    assert not broken.ok and broken.error == "stream error: engine died"
    cut = run(one(server_url, "no-done"))
    assert not cut.ok and cut.error == "the stream ended without [DONE]"
    odd = run(one(server_url, "odd-shape"))
    assert not odd.ok and odd.error == "AttributeError"
    unreachable = run(one("http://127.0.0.1:9", "ok"))
    assert not unreachable.ok and unreachable.error == "ConnectError"


def test_a_target_without_a_model_takes_the_first_its_server_lists(server_url):
    async def resolve():
        async with httpx.AsyncClient() as client:
            return await resolve_target(client, "peer", server_url + "/", None, None)

    assert run(resolve()) == Target("peer", server_url + "/v1", "scripted-model")


def test_levels_run_interleaved_across_targets_with_every_request(server_url):
    targets = [Target("a", server_url + "/v1", "ma"), Target("b", server_url + "/v1", "mb")]
    SEEN.clear()
    order = []
    summaries = run(run_all(targets, [REQUEST] * 4, [Level("concurrency", 2),
                                                     Level("rate", 50.0)],
                            on_result=lambda s: order.append((s["target"], s["level"]))))
    assert order == [("a", 2), ("b", 2), ("a", 50.0), ("b", 50.0)]
    assert [s["completed"] for s in summaries] == [4, 4, 4, 4]
    assert [s["output_tokens"] for s in summaries] == [12, 12, 12, 12]
    assert [b["model"] for b in SEEN] == ["ma"] * 4 + ["mb"] * 4 + ["ma"] * 4 + ["mb"] * 4
