"""End to end: a real `tokenmill serve` with the default model, driven by the official `openai`
client, raw httpx and the seed pages' own Python and JavaScript examples.

Kept cheap for a 2-core CPU: one server for the session, small max_tokens, temperature 0 where the
text is compared. The SIGTERM drain test stops a server of its own: the shared one serves the
other modules after this one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_live import (MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL_ID, start_server, stop_server,
                         tokenmill_command)

from tokenmill.runner.linear_plan import BF16_FLAGS, cpu_info

pytestmark = pytest.mark.slow

CANARY = "zebra-canary-7431"  # appears in a prompt; must never appear in the server's log
MESSAGES = [{"role": "user", "content": "Name three colors of the rainbow."}]


def metric(server, name: str) -> float:
    """The metric's value summed over its label sets (e.g. one per served model)."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert values, f"{name} missing from /metrics"
    return sum(float(v) for v in values)


def wait_idle(server, timeout: float = 15.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric(server, "tokenmill_requests_running") == 0 and \
                metric(server, "tokenmill_requests_waiting") == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError("engine did not return to idle: "
                         f"running={metric(server, 'tokenmill_requests_running')} "
                         f"waiting={metric(server, 'tokenmill_requests_waiting')}")


def sse_payloads(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    return [f[6:] if f[6:] == "[DONE]" else json.loads(f[6:]) for f in frames]


# ---- the seed pages' examples ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_seed_python_example(server, stream, capsys):
    """The Python snippet of the seed pages, with only base_url, api_key and model changed."""
    from openai import OpenAI

    client = OpenAI(
        base_url=server.v1,
        api_key=server.key,
    )

    model = MODEL_ID
    max_tokens = 512

    chat_completion_res = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "system",
                "content": "Act like you are a helpful assistant.",
            },
            {
                "role": "user",
                "content": "Hi there!",
            }
        ],
        stream=stream,
        max_tokens=max_tokens,
    )

    if stream:
        for chunk in chat_completion_res:
            print(chunk.choices[0].delta.content or "")
    else:
        print(chat_completion_res.choices[0].message.content)
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("stream", ["true", "false"])
def test_seed_javascript_example(server, node_openai, stream):
    env = dict(os.environ, TOKENMILL_BASE_URL=server.v1, TOKENMILL_API_KEY=server.key,
               TOKENMILL_MODEL=MODEL_ID, STREAM=stream)
    proc = subprocess.run(["node", str(node_openai / "seed_example.mjs")], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    if stream == "true":
        assert lines[-1] in ("stop", "length") and len(lines) > 2
    else:
        body = json.loads(lines[-1])
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]


def test_seed_curl_example(server):
    """The curl example's JSON body, sent as is (DeepInfra's variant has no max_tokens)."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello!"}], "seed": 1}
    proc = subprocess.run(
        ["curl", "-sS", f"{server.v1}/chat/completions", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {server.key}", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=180)
    out = json.loads(proc.stdout)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"


# ---- behaviour -------------------------------------------------------------------------------


def test_chat_stream_equals_non_stream_at_temperature_0(client):
    full = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                          max_tokens=24)
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                            max_tokens=24, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert text == full.choices[0].message.content and text
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None  # the finish chunk comes last
    assert all(c.usage is None for c in chunks)


def test_completions_stream_equals_non_stream(client):
    kw = dict(model=MODEL_ID, prompt="The capital of France is", temperature=0, max_tokens=16)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert full.id.startswith("cmpl-") and full.object == "text_completion"


def test_completions_list_of_prompts(client):
    out = client.completions.create(model=MODEL_ID, prompt=["One, two,", "Red, green,"], n=2,
                                    temperature=0, max_tokens=6)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    # Greedy: the two choices of one prompt agree; the prompts differ.
    assert out.choices[0].text == out.choices[1].text and out.choices[2].text == out.choices[3].text
    single = client.completions.create(model=MODEL_ID, prompt="Red, green,", temperature=0,
                                       max_tokens=6)
    assert single.choices[0].text == out.choices[2].text
    assert out.usage.prompt_tokens == sum(
        client.completions.create(model=MODEL_ID, prompt=p, max_tokens=1).usage.prompt_tokens
        for p in ["One, two,", "Red, green,"])


def test_n2_non_stream_and_stream(client):
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=2, max_tokens=12,
                                         seed=3)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=2,
                                                 max_tokens=12, seed=3, stream=True))
    texts, finishes = ["", ""], [[], []]
    for c in chunks:
        [ch] = c.choices
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finishes[ch.index].append(ch.finish_reason)
    assert [len(f) for f in finishes] == [1, 1]
    # Same seed, same outputs, streamed or not.
    assert texts == [c.message.content for c in out.choices]


def test_seed_reproducibility(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=1.0,
                                              max_tokens=16, seed=seed).choices[0].message.content

    assert run(1234) == run(1234)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def test_the_choices_of_a_seeded_request_are_independent_of_the_next_seeds(client):
    def run(seed):
        out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=1.0,
                                             max_tokens=16, seed=seed, n=2)
        return [choice.message.content for choice in out.choices]

    first, again, following = run(77), run(77), run(78)
    assert first == again  # reproducible, both choices
    assert first[0] != first[1]
    assert first[1] != following[0]  # before: choice 1 of seed s was choice 0 of seed s + 1


def test_stop_strings(client):
    greedy = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                            max_tokens=24).choices[0].message.content
    words = greedy.split()
    assert len(words) >= 3, greedy
    stop = " " + words[2]
    expected = greedy[:greedy.index(stop)]
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                         max_tokens=24, stop=[stop, "\n\n\n"])
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                                 max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_logprobs(client):
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                         max_tokens=8, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely
        assert t.bytes == list(t.token.encode())
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0,
                                                 max_tokens=8, logprobs=True, top_logprobs=3,
                                                 stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == \
        [(t.token, round(t.logprob, 4)) for t in content]
    plain = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, logprobs=2,
                                      temperature=0)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == plain.choices[0].text


def test_usage_chunk_and_headers(server, http):
    body = {"model": MODEL_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": 10,
            "stream": True, "stream_options": {"include_usage": True}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and all(e["usage"] is None for e in events[:-2])
    full = http.post("/v1/chat/completions", json={**body, "stream": False,
                                                    "stream_options": None}).json()
    assert last["usage"] == full["usage"]
    u = full["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["estimated_cost"] == pytest.approx(u["prompt_tokens"] * 0.02e-6 +
                                                u["completion_tokens"] * 0.04e-6)
    assert u["prompt_tokens_details"]["cached_tokens"] > 0  # same prompt: prefix cache hit
    assert full["system_fingerprint"].startswith("fp_")


def test_the_container_healthcheck_passes_on_a_live_server_and_fails_without_one(server):
    dockerfile = (Path(__file__).parents[2] / "deploy" / "Dockerfile").read_text()
    [line] = [line for line in dockerfile.splitlines() if line.strip().startswith("CMD [")
              and "health" in line]
    command = json.loads(line.strip()[len("CMD "):])
    assert command[:2] == ["tokenmill", "health"]
    url = command.index("--url") + 1

    def run(base_url: str) -> subprocess.CompletedProcess:
        args = tokenmill_command() + command[1:url] + [base_url] + command[url + 1:]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    ok = run(server.base_url)
    assert ok.returncode == 0 and ok.stdout.startswith(f"{server.base_url}/health: 200")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        gone = run(f"http://127.0.0.1:{closed.getsockname()[1]}")
    assert gone.returncode == 1 and "unreachable" in gone.stdout


def test_models_health_metrics_docs(server, client):
    [card] = client.models.list().data
    assert card.id == MODEL_ID and card.owned_by == "tokenmill" and card.created > 0
    assert card.context_length == MAX_MODEL_LEN
    assert card.pricing == {"input": 0.02, "output": 0.04}
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.get(server.base_url + "/health").status_code == 200
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("tokenmill_requests_running", "tokenmill_requests_waiting",
                 "tokenmill_kv_cache_usage_ratio", "tokenmill_prompt_tokens_total",
                 "tokenmill_generation_tokens_total"):  # one series per served model
        assert re.search(rf'^{name}{{model="{MODEL_ID}"}} ', text, re.M), name
    for name in ("tokenmill_time_to_first_token_seconds_count",
                 "tokenmill_inter_token_latency_seconds_count"):
        assert re.search(rf"^{name} ", text, re.M), name
    assert metric(server, "tokenmill_generation_tokens_total") > 0
    assert httpx.get(server.base_url + "/").status_code == 200  # the web catalog, without a key
    assert "/v1/chat/completions" in httpx.get(server.base_url + "/openapi.json").json()["paths"]


def test_a_key_created_or_revoked_by_the_cli_counts_on_the_next_request(server):
    """`tokenmill keys` writes the store the running server reads on every request."""
    env = dict(os.environ, TOKENMILL_HOME=str(server.home))

    def keys(*args: str) -> str:
        done = subprocess.run(tokenmill_command() + ["keys", *args], env=env, check=True,
                              capture_output=True, text=True, timeout=120)
        return done.stdout

    key = keys("create", "--name", "cli-user").splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(server.v1 + "/models", headers=headers).status_code == 200
    assert "cli-user" in keys("list")
    keys("revoke", "--name", "cli-user")
    r = httpx.get(server.v1 + "/models", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key")


# ---- errors ----------------------------------------------------------------------------------


def _error(exc) -> dict:
    return exc.value.response.json()["error"]


def test_errors_through_the_official_client(server, client):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.v1, api_key="sk-tm-wrong", max_retries=0).models.list()
    assert _error(e)["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="microsoft/wizardlm-2-7b", messages=MESSAGES)
    assert _error(e)["code"] == "model_not_found"
    for kw, param in [({"temperature": 3}, "temperature"), ({"n": 9}, "n"),
                      ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
                      ({"stop": ["x"] * 17}, "stop"),
                      ({"presence_penalty": -5}, "presence_penalty"),
                      ({"response_format": {"type": "json_schema", "json_schema": {
                          "name": "x", "schema": {"type": "objekt"}}}}, "response_format"),
                      ({"tools": [{"type": "function", "function": {"name": "not ok"}}]}, "tools"),
                      ({"stream_options": {"include_usage": True}}, "stream_options")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, **kw)
        err = _error(e)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (kw, err)


def test_context_length_exceeded(client):
    long = [{"role": "user", "content": "hello " * MAX_MODEL_LEN}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=long, stream=stream)
        assert _error(e)["code"] == "context_length_exceeded" and _error(e)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=MAX_MODEL_LEN)
    assert _error(e)["code"] == "context_length_exceeded" and _error(e)["param"] == "max_tokens"
    # Without max_tokens the default is clamped to fit instead.
    near = [{"role": "user", "content": "hello " * (MAX_MODEL_LEN - 60)}]
    out = client.chat.completions.create(model=MODEL_ID, messages=near, temperature=0)
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= MAX_MODEL_LEN


def test_raw_http_errors(server, http):
    def err(r, status):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
        return e

    assert err(http.post("/v1/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"}), 400)["type"] == \
        "invalid_request_error"
    assert err(http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": "hi"}),
               400)["param"] == "messages"
    big = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    assert err(http.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"
    assert err(httpx.get(server.v1 + "/models"), 401)["code"] == "invalid_api_key"
    assert err(httpx.get(server.v1 + "/models", headers={"Authorization": "Basic abc"}), 401)
    # And the server still serves.
    ok = http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES,
                                                 "max_tokens": 2, "no_such_field": 1})
    assert ok.status_code == 200


def test_float32_edge_parameters_are_served_and_the_engine_lives(server, http):
    """Schemathesis found that top_p=5e-324 (accepted: 0 < top_p) killed the step loop; every
    such value must get a normal answer, and /health must stay 200."""
    edge = [{"top_p": 5e-324}, {"temperature": 1e-300}, {"repetition_penalty": 5e-324},
            {"min_p": 5e-324, "top_k": 1}, {"temperature": 2.0, "top_p": 1e-45}]
    for params in edge:
        for route, body in [("/v1/completions", {"prompt": "\ubacc\u00ef"}),
                            ("/v1/chat/completions", {"messages": MESSAGES})]:
            r = http.post(route, json={"model": MODEL_ID, "max_tokens": 3, **body, **params})
            assert r.status_code == 200, (route, params, r.text)
            assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200


# ---- hang-ups --------------------------------------------------------------------------------


async def test_hangups_abort_and_free_the_engine(server):
    """200 requests that would each generate 900 tokens hang up after 0.5 s without a byte,
    or 3 s in all (half streaming); none may finish, then a normal request must succeed
    quickly and the running/waiting gauges must be back at 0."""
    client = openai.AsyncOpenAI(base_url=server.v1, api_key=server.key, max_retries=0,
                                timeout=0.5)
    messages = [{"role": "user", "content": f"Tell me a long story. {CANARY}"}]
    extra = {"min_tokens": 900, "ignore_eos": True}

    async def one(i):
        # httpx's timeout bounds each read, not the whole stream: once most requests have hung
        # up, a survivor's chunks come faster than 0.5 s apart, so the stream also gets a total
        # deadline (its task cancelled and its connection closed, as a client's would be). 3 s
        # leave a loaded machine time to start every request (they must reach the engine to
        # be counted as disconnected) and allow a stream ~200 of its 900 tokens at most.
        async with asyncio.timeout(3):
            if i % 2:
                stream = await client.chat.completions.create(
                    model=MODEL_ID, messages=messages, max_tokens=900, stream=True,
                    extra_body=extra)
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(model=MODEL_ID, messages=messages,
                                                     max_tokens=900, extra_body=extra)

    results = await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
    assert all(isinstance(r, (openai.APITimeoutError, TimeoutError)) for r in results), \
        {type(r).__name__ for r in results}
    await client.close()

    start = time.monotonic()
    normal = openai.AsyncOpenAI(base_url=server.v1, api_key=server.key, max_retries=0, timeout=15)
    out = await normal.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=5)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - start < 15
    await normal.close()
    await asyncio.to_thread(wait_idle, server)
    deadline = time.monotonic() + 5  # and no admission slot leaked in the HTTP layer
    while metric(server, "tokenmill_http_requests_in_flight") != 0:
        assert time.monotonic() < deadline, "in-flight HTTP requests did not return to 0"
        await asyncio.sleep(0.1)
    text = httpx.get(server.base_url + "/metrics").text
    assert "tokenmill_requests_total{endpoint=\"chat\",outcome=\"disconnected\"}" in text


@pytest.mark.parametrize("stream", [False, True])
def test_single_hangup_aborts_at_once(server, stream):
    """A long request is running; the client closes its socket; the engine is idle at once."""
    body = json.dumps({"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 900,
                       "min_tokens": 900, "ignore_eos": True, "stream": stream}).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + server.key.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " +
                 str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 20
    while metric(server, "tokenmill_requests_running") < 1:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.05)
    sock.close()
    assert wait_idle(server, timeout=5) < 2.0


async def test_a_burst_of_fanned_out_calls_is_shed_without_a_5xx_and_health_stays_200(server):
    """20 simultaneous /v1/completions calls of 64 prompts x n=8 (10,240 sequences, ten times
    the server's capacity of 1024, whose key share is 512: one call at a time): each is served or
    refused with a 429, /health answers 200 all along, and a normal request is served once the
    burst has drained."""
    body = {"model": MODEL_ID, "prompt": ["Hi"] * 64, "n": 8, "max_tokens": 2, "temperature": 0}
    headers = {"Authorization": f"Bearer {server.key}"}
    health: list[int] = []

    async with httpx.AsyncClient(base_url=server.v1, headers=headers, timeout=300) as http:
        async def watch_health(done: asyncio.Event) -> None:
            async with httpx.AsyncClient(timeout=10) as probe:
                while not done.is_set():
                    health.append((await probe.get(server.base_url + "/health")).status_code)
                    await asyncio.sleep(0.2)

        done = asyncio.Event()
        watcher = asyncio.create_task(watch_health(done))
        answers = await asyncio.gather(*(http.post("/completions", json=body)
                                         for _ in range(20)))
        done.set()
        await watcher
        statuses = sorted(r.status_code for r in answers)
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        for r in answers:
            if r.status_code == 200:
                assert len(r.json()["choices"]) == 512
            else:
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert health and set(health) == {200}
        normal = await http.post("/chat/completions", json={
            "model": MODEL_ID, "messages": MESSAGES, "max_tokens": 3})
        assert normal.status_code == 200
    await asyncio.to_thread(wait_idle, server)


# ---- logs and shutdown --------------------------------------------------------------------------


def test_logs_never_hold_keys_or_prompts(server):
    log = server.output()
    assert log.count(server.key) == 1  # printed once, at creation, never logged
    assert CANARY not in log and "rainbow" not in log


@pytest.fixture
def own_server(default_model_path, tmp_path):
    """A server for this test alone (the drain test stops it), with the CLI's default
    quantization."""
    running = start_server(tmp_path, ["--model", str(default_model_path), "--max-model-len",
                                      str(MAX_MODEL_LEN), "--kv-cache-gib", "0.25",
                                      "--drain-timeout", "20"], quantization=None)
    yield running
    stop_server(running)


def test_serve_defaults_to_auto_quantization_and_logs_what_it_chose(own_server):
    """The default model is a Q4_1 GGUF: auto keeps it at int4, says so once at start-up, and
    the server answers through those linears."""
    log = own_server.output()
    kv = "bfloat16" if cpu_info()[1] & BF16_FLAGS else "float32"
    assert ("quantization auto -> int4 (the source's layer weights are 5 bits each); KV cache "
            f"{kv}") in log, log[-3000:]
    assert "linears: int4: " in log
    r = httpx.post(own_server.v1 + "/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {own_server.key}"},
                   json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4,
                         "min_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_sigterm_drains_in_flight_requests(own_server):
    """SIGTERM: /health turns 503, the in-flight stream still completes, the process exits."""
    server = own_server
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 30, "min_tokens": 30,
            "stream": True, "temperature": 0}
    events = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {server.key}"}) as c:
        with c.stream("POST", server.v1 + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                health = httpx.get(server.base_url + "/health", timeout=2).status_code
            except httpx.TransportError:
                health = "refused"
            assert health in (503, "refused")
            events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length"
    assert server.proc.wait(timeout=30) is not None
    assert f"engine of {MODEL_ID} stopped" in server.output()
