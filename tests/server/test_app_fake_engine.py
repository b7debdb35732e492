"""Route logic against a scripted engine (no model): response shapes, streaming framing, errors,
auth, limits and aborts. The real-model behaviour is in test_openai_server.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from server_fakes import REPLY, FakeEngine, served
from tokenmill.catalog.pricing import Price
from tokenmill.engine.async_llm import StepFailedError
from tokenmill.server.app import build_app
from tokenmill.platform.keys import KeyService
from tokenmill.platform.ledger import Ledger
from tokenmill.platform.store import open_store
from tokenmill.platform.limits import InProcessLimiter
from tokenmill.server.auth import ensure_admin_key
from tokenmill.server.state import Demand, ServerSettings

MODEL = "fake-model"


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def key_store(tmp_path):
    """The platform's keys over a real SQLite store (the store's own tests cover PostgreSQL)."""
    store = open_store(f"sqlite:///{tmp_path / 'tokenmill.db'}")
    yield KeyService(store)
    store.close()


@pytest.fixture
def admin_key(key_store, tmp_path):
    return ensure_admin_key(key_store, tmp_path)


def make_client(engine, key_store, **overrides):
    ledger = None if key_store is None else Ledger(key_store.store)
    settings = ServerSettings(keys=key_store, ledger=ledger, created=1700000000, **overrides)
    app = build_app([served(engine, MODEL)], settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app


@pytest.fixture
async def client(engine, key_store, admin_key):
    c, _ = make_client(engine, key_store)
    c.headers["Authorization"] = f"Bearer {admin_key}"
    async with c:
        yield c


PROMPT_TEXT = "<user>Hi<assistant>"  # chat_body's one message through the fake chat template


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kw}


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    frames = text.split("\n\n")
    assert frames[-1] == ""
    out = []
    for frame in frames[:-1]:
        assert frame.startswith("data: "), frame
        payload = frame[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


ANY = object()


def assert_error(resp, status, code=ANY, param=None, type_="invalid_request_error"):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    if code is not ANY:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


async def test_chat_non_streaming_shape_and_usage(client):
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=100))
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and body["system_fingerprint"] == "tokenmill"
    [choice] = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": REPLY,
                                              "refusal": None, "tool_calls": None},
                      "logprobs": None, "finish_reason": "stop"}
    prompt = len("<user>Hi<assistant>")
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt and usage["completion_tokens"] == len(REPLY)
    assert usage["total_tokens"] == prompt + len(REPLY)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["estimated_cost"] == pytest.approx(prompt * 0.02e-6 + len(REPLY) * 0.04e-6)


async def test_chat_stream_framing(client):
    r = await client.post("/v1/chat/completions",
                          json=chat_body(stream=True, n=2, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # First delta of each choice carries the role; no other delta does.
    role = {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [role, role]
    assert not any("role" in c["choices"][0]["delta"] for c in chunks[2:-1])
    # usage is null on every chunk but the last, which has no choices.
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * len(REPLY)
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for c in chunks[:-1]:
        [ch] = c["choices"]
        texts[ch["index"]] += ch["delta"].get("content") or ""
        if ch["finish_reason"]:
            assert ch["delta"] == {}
            finishes[ch["index"]].append(ch["finish_reason"])
    assert texts == {0: REPLY, 1: REPLY} and finishes == {0: ["stop"], 1: ["stop"]}


async def test_stream_without_include_usage_has_no_usage_key(client):
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    chunks = sse_events(r.text)[:-1]
    assert all("usage" not in c and c["choices"] for c in chunks)


async def test_max_tokens_length_and_logprobs(client):
    r = await client.post("/v1/chat/completions",
                          json=chat_body(max_completion_tokens=3, logprobs=True, top_logprobs=1))
    [choice] = r.json()["choices"]
    assert choice["message"]["content"] == REPLY[:3] and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [t["token"] for t in content] == list(REPLY[:3])
    assert content[0] == {"token": "H", "logprob": -0.5, "bytes": [72],
                          "top_logprobs": [{"token": "H", "logprob": -0.5, "bytes": [72]}]}


async def test_sampling_params_mapping(client, engine):
    r = await client.post("/v1/chat/completions", json=chat_body(
        temperature=0, top_p=0.5, stop=["x", "y"], seed=7, logit_bias={"42": 5},
        top_k=3, min_p=0.1, repetition_penalty=1.2, min_tokens=1, ignore_eos=True,
        stop_token_ids=[5], presence_penalty=0.5, frequency_penalty=-0.5, user="u1",
        some_future_field={"ignored": True}))
    assert r.status_code == 200, r.text
    _, p, _ = engine.calls[-1]
    assert (p.temperature, p.top_p, p.stop, p.seed, p.logit_bias, p.top_k, p.min_p) == \
        (0.0, 0.5, ("x", "y"), 7, {42: 5.0}, 3, 0.1)
    assert (p.repetition_penalty, p.min_tokens, p.ignore_eos, p.stop_token_ids) == \
        (1.2, 1, True, (5,))
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.5, -0.5, None)
    # max_tokens not set: 512 clamped to what fits in the context.
    assert p.max_tokens == 256 - len("<user>Hi<assistant>")


async def test_content_parts_and_system_anywhere(client, engine):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [{"role": "user", "content": parts},
                {"role": "assistant", "content": "c"}, {"role": "system", "content": "s"},
                {"role": "tool", "content": "t", "tool_call_id": "1"},
                {"role": "user", "content": "d"}]
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    prompt, _, _ = engine.calls[-1]
    assert "".join(map(chr, prompt)) == "<user>ab<assistant>c<system>s<tool>t<user>d<assistant>"


@pytest.mark.parametrize("body, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 9}, "n"),
    ({"n": "2"}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 200}}, "logit_bias.5"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"²": 1}}, "logit_bias"),
    ({"logit_bias": {"--5": 1}}, "logit_bias"),
    ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"seed": 18446744073709551616}, "seed"),
    ({"seed": 18446744073709551615, "n": 2}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 123}]}, "messages.0.content"),
    ({"messages": "hello"}, "messages"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"tools": [{"type": "function", "function": {"name": "not ok"}}]}, "tools"),
    ({"messages": [{"role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
async def test_bad_requests_are_400_with_param(client, body, param):
    r = await client.post("/v1/chat/completions", json=chat_body(**body))
    err = assert_error(r, 400)
    assert err["param"] == param, err
    # The server still works afterwards.
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_malformed_json_and_missing_fields(client):
    r = await client.post("/v1/chat/completions", content=b'{"model": ',
                          headers={"content-type": "application/json"})
    assert_error(r, 400)
    no_model = {"messages": [{"role": "user", "content": "x"}]}
    r = await client.post("/v1/chat/completions", json=no_model)
    assert_error(r, 400, code="missing_required_parameter", param="model")
    r = await client.post("/v1/chat/completions", content=b"[" * 100000 + b"]" * 100000,
                          headers={"content-type": "application/json"})
    assert_error(r, 400)
    r = await client.post("/v1/chat/completions", content=b"model=x",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 400)


async def test_response_format_text_is_accepted(client):
    r = await client.post("/v1/chat/completions", json=chat_body(response_format={"type": "text"}))
    assert r.status_code == 200


async def test_context_length_exceeded(client):
    long = "x" * 300
    r = await client.post("/v1/chat/completions",
                          json=chat_body(messages=[{"role": "user", "content": long}]))
    assert_error(r, 400, code="context_length_exceeded", param="messages")
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=250))
    assert_error(r, 400, code="context_length_exceeded", param="max_tokens")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "y" * 256})
    assert_error(r, 400, code="context_length_exceeded", param="prompt")
    # The boundary: prompt + max_tokens == context fits.
    r = await client.post("/v1/completions",
                          json={"model": MODEL, "prompt": "y" * 250, "max_tokens": 6})
    assert r.status_code == 200


async def test_unknown_model_and_route(client):
    r = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4"))
    assert_error(r, 404, code="model_not_found", param="model")
    assert_error(await client.get("/v1/models/gpt-4"), 404, code="model_not_found")
    assert_error(await client.get("/v1/nope"), 404, code="not_found")


async def test_auth(engine, key_store, admin_key, tmp_path):
    c, _ = make_client(engine, key_store)
    async with c:
        assert_error(await c.get("/v1/models"), 401, code="invalid_api_key")
        wrong = {"Authorization": "Bearer sk-tm-wrongwrongwrong"}
        err = assert_error(await c.get("/v1/models", headers=wrong), 401, code="invalid_api_key")
        assert "wrongwrongwrong" not in err["message"]
        assert_error(await c.get("/v1/models", headers={"Authorization": admin_key}), 401,
                     code="invalid_api_key")
        # Auth is checked before the body is even parsed.
        assert_error(await c.post("/v1/chat/completions", content=b"{"), 401,
                     code="invalid_api_key")
        ok = await c.get("/v1/models", headers={"Authorization": f"Bearer {admin_key}"})
        assert ok.status_code == 200
        # Public routes.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200
        # No /docs: its page would load scripts from a CDN (the web front is all served here).
        assert (await c.get("/docs")).status_code == 404


async def test_no_auth(engine):
    c, _ = make_client(engine, None)
    async with c:
        assert (await c.get("/v1/models")).status_code == 200
        # Nothing is recorded without keys: a 400 that says so, never every key's usage.
        for path in ("/v1/usage", "/v1/usage/summary"):
            assert_error(await c.get(path), 400, code="usage_not_recorded")


async def test_models(client, engine):
    body = (await client.get("/v1/models")).json()
    card = {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "tokenmill",
            "context_length": 256, "pricing": {"input": 0.02, "output": 0.04}}
    assert body == {"object": "list", "data": [card]}
    assert (await client.get(f"/v1/models/{MODEL}")).json() == card


async def test_two_models_answer_by_id_and_bill_at_their_own_prices(key_store, admin_key):
    cheap, dear = FakeEngine(), FakeEngine(max_model_len=128)
    settings = ServerSettings(keys=key_store, created=1700000000)
    app = build_app([served(cheap, "org/cheap", Price(input=20_000, output=40_000)),
                     served(dear, "org/dear", Price(input=390_000, output=650_000,
                                                    cached_input=100_000))], settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        listed = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["owned_by"], m["context_length"], m["pricing"]) for m in listed] == [
            ("org/cheap", "org", 256, {"input": 0.02, "output": 0.04}),
            ("org/dear", "org", 128, {"input": 0.39, "output": 0.65, "cached_input": 0.1})]
        costs = {}
        for model, engine in (("org/cheap", cheap), ("org/dear", dear)):
            body = (await c.post("/v1/chat/completions",
                                 json=chat_body(model=model, max_tokens=5))).json()
            assert body["model"] == model
            assert engine.calls[-1][2] == body["id"]  # served by that model's engine
            usage = body["usage"]
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(PROMPT_TEXT), 5)
            costs[model] = usage["estimated_cost"]
        # 19 prompt + 5 completion tokens at each model's price (micro-USD per 1M = picodollars)
        assert costs == {"org/cheap": (19 * 20_000 + 5 * 40_000) / 1e12,
                         "org/dear": (19 * 390_000 + 5 * 650_000) / 1e12}
        r = await c.post("/v1/chat/completions", json=chat_body(model="org/other"))
        assert_error(r, 404, code="model_not_found", param="model")
        assert "Served models: org/cheap, org/dear." in r.json()["error"]["message"]
        assert_error(await c.get("/v1/models/org/other"), 404, code="model_not_found")


async def test_body_limit_413(engine, key_store, admin_key):
    c, _ = make_client(engine, key_store, max_body_bytes=1000)
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        big = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
        assert_error(await c.post("/v1/chat/completions", json=big), 413, code="request_too_large")

        async def chunks():  # no Content-Length: counted as it streams in
            yield json.dumps(big).encode()

        r = await c.post("/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"})
        assert_error(r, 413, code="request_too_large")


async def test_queue_full_and_draining_503(engine, key_store, admin_key):
    engine.delay = 0.05
    c, app = make_client(engine, key_store, max_pending_sequences=1, max_key_share=1.0)
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        first = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        await asyncio.sleep(0.02)
        r = await c.post("/v1/chat/completions", json=chat_body())
        assert_error(r, 503, code="server_overloaded", type_="server_error")
        assert r.headers["retry-after"] == "1"
        assert (await first).status_code == 200
        app.state.server_state.draining = True
        assert_error(await c.post("/v1/chat/completions", json=chat_body()), 503,
                     code="server_draining", type_="server_error")
        assert (await c.get("/health")).status_code == 503


def completions(prompts: int, n: int, **body) -> dict:
    return {"model": MODEL, "prompt": ["ab"] * prompts, "n": n, "max_tokens": 4, **body}


async def test_admission_counts_sequences_not_requests(engine, key_store, admin_key):
    engine.delay = 0.05
    c, app = make_client(engine, key_store, max_pending_sequences=10, max_key_share=1.0)
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        first = asyncio.create_task(c.post("/v1/completions", json=completions(4, 2)))
        while app.state.server_state.held.sequences == 0:
            await asyncio.sleep(0.005)
        assert app.state.server_state.held.sequences == 8  # 4 prompts x n=2
        r = await c.post("/v1/completions", json=completions(2, 2))  # 4 more: 12 > 10
        assert_error(r, 503, code="server_overloaded", type_="server_error")
        assert r.headers["retry-after"] == "1"
        assert (await c.post("/v1/completions", json=completions(1, 2))).status_code == 200
        assert (await first).status_code == 200
    assert (app.state.server_state.held, app.state.server_state.in_flight) == (Demand(0, 0), 0)


async def test_one_key_fanning_out_cannot_take_the_capacity_of_the_others(
        engine, key_store, admin_key):
    engine.delay = 0.05
    other, _ = key_store.create("other")
    c, app = make_client(engine, key_store, max_pending_sequences=16, max_key_share=0.5)
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        r = await c.post("/v1/completions", json=completions(5, 2))  # 10 > the share of 8
        err = assert_error(r, 429, code="rate_limit_exceeded", type_="requests")
        assert "Request too large" in err["message"] and "retry-after" not in r.headers
        fan = asyncio.create_task(c.post("/v1/completions", json=completions(4, 2)))
        while app.state.server_state.held.sequences == 0:
            await asyncio.sleep(0.005)
        r = await c.post("/v1/completions", json=completions(1, 1))  # 9 > 8 for this key
        assert_error(r, 429, code="rate_limit_exceeded", type_="requests")
        assert r.headers["retry-after"] == "1"
        r = await c.post("/v1/completions", json=completions(4, 2),
                         headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 200  # the other key still has its share
        assert (await fan).status_code == 200


async def test_overload_is_refused_before_any_tokenizing(engine, key_store, admin_key):
    engine.delay = 0.05
    c, app = make_client(engine, key_store, max_pending_sequences=1, max_key_share=1.0)
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        first = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body()))
        while not engine.calls:  # tokenized and generating
            await asyncio.sleep(0.005)
        encoded = engine.tokenizer.encode

        def refuse_to_tokenize(*args, **kwargs):
            raise AssertionError("a refused request was tokenized")

        engine.tokenizer.encode = refuse_to_tokenize
        r = await c.post("/v1/chat/completions", json=chat_body())
        assert_error(r, 503, code="server_overloaded", type_="server_error")
        engine.tokenizer.encode = encoded
        assert (await first).status_code == 200


async def test_the_deadline_covers_tokenizing(engine, key_store, admin_key):
    c, app = make_client(engine, key_store, request_timeout_s=0.2)
    encoded = engine.tokenizer.encode

    def slow_encode(*args, **kwargs):
        time.sleep(0.5)
        return encoded(*args, **kwargs)

    engine.tokenizer.encode = slow_encode
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        r = await c.post("/v1/chat/completions", json=chat_body())
        assert_error(r, 504, code="timeout", type_="server_error")
    assert app.state.server_state.in_flight == 0 and engine.calls == []


@pytest.mark.parametrize("body, param", [
    (chat_body(messages=[{"role": "user", "content": "ok"},
                         {"role": "user", "content": "bad \ud800"}]), "messages.1.content"),
    ({"model": MODEL, "prompt": ["ok", "bad \udfff"]}, "prompt.1"),
    ({"model": MODEL, "prompt": "\ud83d"}, "prompt"),
])
async def test_text_no_tokenizer_can_encode_is_a_400_naming_the_field(client, body, param):
    raw = json.dumps(body).replace("\\\\u", "\\u")  # the JSON escape of a lone surrogate
    r = await client.post("/v1/chat/completions" if "messages" in body else "/v1/completions",
                          content=raw, headers={"content-type": "application/json"})
    assert "not valid Unicode" in assert_error(r, 400, code="invalid_value", param=param)["message"]


async def test_an_unexpected_error_is_a_500_naming_the_request_id_and_nothing_internal(
        client, engine, caplog):
    def broken(*args):
        raise RuntimeError("secret internals")

    engine.check_prompt = broken
    r = await client.post("/v1/chat/completions", json=chat_body())
    err = assert_error(r, 500, code="internal_error", type_="server_error")
    request_id = r.headers["x-request-id"]
    assert request_id.startswith("req_") and f"(request id {request_id})" in err["message"]
    assert "secret" not in r.text
    [logged] = [rec for rec in caplog.records if rec.exc_info]  # the traceback, once
    assert request_id in logged.getMessage() and "secret internals" in caplog.text
    other = (await client.get("/v1/models")).headers["x-request-id"]
    assert other.startswith("req_") and other != request_id


async def test_a_max_tokens_beyond_the_context_is_a_400_not_an_admission_429(client):
    for endpoint, body in (("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                "max_tokens": 10**9}),
                           ("/v1/chat/completions", chat_body(max_completion_tokens=10**9))):
        r = await client.post(endpoint, json=body)
        assert_error(r, 400, code="context_length_exceeded")


async def test_health_follows_engine(client, engine):
    assert (await client.get("/health")).status_code == 200
    engine.healthy = False
    assert (await client.get("/health")).status_code == 503


async def test_deadline_aborts(engine, key_store, admin_key):
    engine.delay = 0.2
    c, _ = make_client(engine, key_store, request_timeout_s=0.3)
    async with c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        r = await c.post("/v1/chat/completions", json=chat_body())
        assert_error(r, 504, code="timeout", type_="server_error")
        r = await c.post("/v1/chat/completions", json=chat_body(stream=True))
        events = sse_events(r.text)
        assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert len(engine.aborted) == 2 and not engine.running


async def test_completions_list_prompt_indices(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cde"], "n": 2,
                                                   "max_tokens": 4, "logprobs": 1})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == REPLY[:4] and c["finish_reason"] == "length" for c in body["choices"])
    assert body["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert body["choices"][0]["logprobs"]["top_logprobs"][0] == {"H": -0.5}
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 16


async def test_completions_stream_and_echo(client):
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": [[65, 66]], "echo": True, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == "AB" + REPLY[:3]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("length") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5


async def test_completions_echo_returns_the_prompt_strings_as_sent(client, engine):
    engine.tokenizer.decode = None  # string prompts are echoed as sent, never re-decoded
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cde"],
                                                   "echo": True, "max_tokens": 2})
    assert [c["text"] for c in r.json()["choices"]] == ["ab" + REPLY[:2], "cde" + REPLY[:2]]


async def test_completions_token_ids_out_of_vocab(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 100000]})
    assert_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 100000],
                                                   "stream": True})
    assert_error(r, 400, param="prompt")  # refused before the stream starts
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", ""]})
    assert_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "suffix": "y"})
    assert_error(r, 400, param="suffix")


async def test_metrics_counts(client):
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    text = (await client.get("/metrics")).text
    for name in ("tokenmill_requests_running", "tokenmill_requests_waiting",
                 "tokenmill_kv_cache_usage_ratio", "tokenmill_time_to_first_token_seconds_bucket",
                 "tokenmill_inter_token_latency_seconds_bucket"):
        assert name in text
    assert f'tokenmill_generation_tokens_total{{model="{MODEL}"}} 5.0' in text
    assert 'tokenmill_requests_total{endpoint="chat",outcome="ok"} 1.0' in text


async def test_openapi_documents_routes(client):
    spec = (await client.get("/openapi.json")).json()
    routes = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    assert routes <= set(spec["paths"])


async def test_engine_failure_mid_stream_is_an_error_event(client, engine):
    engine.fail_after = 2
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert [c["choices"][0]["delta"].get("content") for c in events[:3]] == ["", "H", "e"]
    assert events[-2] == {"error": {"message": "The inference engine stopped.",
                                    "type": "server_error", "param": None,
                                    "code": "engine_unavailable"}}
    assert events[-1] == "[DONE]"
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert_error(r, 503, code="engine_unavailable", type_="server_error")
    assert "boom" not in r.text


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_step_is_a_500_for_its_request_alone_and_billed_as_error(
        client, engine, key_store, stream):
    engine.failure, engine.fail_after = StepFailedError, 2
    r = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
    expected = {"message": "The server had an error while generating this request; the request "
                "was dropped, and a retry may succeed.", "type": "server_error", "param": None,
                "code": "engine_step_failed"}
    if stream:
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[-2] == {"error": expected} and events[-1] == "[DONE]"
    else:
        assert r.status_code == 500 and r.json() == {"error": expected}
    assert "boom" not in r.text
    [record] = Ledger(key_store.store).query().data
    assert record.status == "error" and record.completion_tokens == 2
    engine.fail_after = None
    assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


# ---- the usage ledger ------------------------------------------------------------------------

async def test_every_response_has_one_usage_record_that_adds_up_to_what_it_reported(
        client, key_store):
    full = (await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))).json()
    streamed = sse_events((await client.post("/v1/completions", json={
        "model": MODEL, "prompt": ["ab", "cde"], "n": 2, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})).text)
    usage = (await client.get("/v1/usage")).json()
    assert [r["id"] for r in usage["data"]] == [full["id"], streamed[0]["id"]]
    streamed = streamed[:-1]  # [DONE]
    for record, reported in zip(usage["data"], [full["usage"], streamed[-1]["usage"]]):
        assert (record["prompt_tokens"], record["completion_tokens"], record["cost"]) == (
            reported["prompt_tokens"], reported["completion_tokens"], reported["estimated_cost"])
        assert (record["model"], record["status"], record["finish_reason"]) == (
            MODEL, "completed", "length")
    assert usage["total_cost"] == full["usage"]["estimated_cost"] + \
        streamed[-1]["usage"]["estimated_cost"]
    assert usage["has_more"] is False
    page = (await client.get("/v1/usage", params={"limit": 1})).json()
    assert ([r["id"] for r in page["data"]], page["has_more"]) == ([full["id"]], True)
    rest = (await client.get("/v1/usage", params={"after": full["id"]})).json()
    assert [r["id"] for r in rest["data"]] == [streamed[0]["id"]]


async def test_a_client_stalled_then_gone_is_billed_once_and_its_cost_counted_by_the_limiter(
        engine, key_store, admin_key):
    """The client stops reading (a `send` blocks) and then disconnects: Starlette cancels the
    response outside the stream's generator. Its aborted record must be written and the limiter
    must count its tokens and cost, before the response is done."""
    key, _ = key_store.create("stalls", tpm=100_000, budget_usd="1")
    _, app = make_client(engine, key_store)
    body = json.dumps(chat_body(stream=True)).encode()
    stalled = asyncio.Event()
    sent = 0

    async def send(message):
        nonlocal sent
        if message["type"] == "http.response.body":
            sent += 1
            if sent == 4:  # the role chunk and two tokens went out; the next send never returns
                stalled.set()
                await asyncio.Event().wait()

    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await stalled.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path":
             "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "server": ("test", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {key}".encode()),
                         (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    await asyncio.wait_for(app(scope, receive, send), 30)
    records = Ledger(key_store.store).query(key_store.ids_by_name()["stalls"]).data
    [record] = records
    assert record.status == "aborted" and record.completion_tokens >= 2
    held = app.state.server_state.limiter.usage(key_store.ids_by_name()["stalls"])
    assert (held.open, held.reserved_pico) == (0, 0)
    assert held.spent_pico == record.cost_pico
    assert held.tokens == record.prompt_tokens + record.completion_tokens


async def test_one_key_never_sees_another_keys_usage(client, engine, key_store):
    mine = (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).json()
    other_key, _ = key_store.create("other")
    other = {"Authorization": f"Bearer {other_key}"}
    assert (await client.get("/v1/usage", headers=other)).json()["data"] == []
    r = await client.get("/v1/usage", headers=other, params={"after": mine["id"]})
    assert_error(r, 400, param="after")
    for bad in ({"limit": 0}, {"limit": 1001}, {"start": "yesterday"}):
        assert_error(await client.get("/v1/usage", params=bad), 400)


async def test_usage_without_keys_is_a_clear_400(engine):
    c, _ = make_client(engine, None)
    async with c:
        assert_error(await c.get("/v1/usage"), 400, code="usage_not_recorded")


# ---- rate limits, budgets and model restrictions --------------------------------------------

async def post_as(client, key: str, **body):
    return await client.post("/v1/chat/completions", json=chat_body(**body),
                             headers={"Authorization": f"Bearer {key}"})


async def test_of_12_simultaneous_requests_against_rpm_5_exactly_5_succeed(client, key_store):
    key, _ = key_store.create("limited", rpm=5)
    answers = await asyncio.gather(*(post_as(client, key, max_tokens=2) for _ in range(12)))
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 7
    refused = [r for r in answers if r.status_code == 429]
    for r in refused:
        assert_error(r, 429, code="rate_limit_exceeded", type_="requests")
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    ok = next(r for r in answers if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "5"
    usage = (await client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})).json()
    assert len(usage["data"]) == 5  # refused requests are not billed


async def test_tokens_per_minute_admit_what_fits_and_reconcile_to_what_was_used(
        client, key_store):
    # Each request reserves 19 prompt + 10 max_tokens = 29 tokens and uses 19 + 10.
    key, _ = key_store.create("tpm", tpm=60)
    answers = await asyncio.gather(*(post_as(client, key, max_tokens=10) for _ in range(4)))
    assert sorted(r.status_code for r in answers) == [200, 200, 429, 429]
    r = next(r for r in answers if r.status_code == 429)
    assert_error(r, 429, code="rate_limit_exceeded", type_="requests")
    assert r.headers["x-ratelimit-limit-tokens"] == "60"


async def test_a_tiny_budget_gives_one_success_then_insufficient_quota(client, key_store):
    key, _ = key_store.create("poor", budget_usd="0.000000000001")  # one picodollar
    assert (await post_as(client, key, max_tokens=2)).status_code == 200
    r = await post_as(client, key, max_tokens=2)
    assert_error(r, 429, code="insufficient_quota", type_="insufficient_quota")
    assert "retry-after" not in r.headers


async def test_every_response_to_a_limited_key_carries_its_rate_headers(client, key_store):
    key, _ = key_store.create("metered", rpm=7, tpm=1000)
    as_key = {"Authorization": f"Bearer {key}"}
    r = await client.get("/v1/models", headers=as_key)
    assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"],
            r.headers["x-ratelimit-reset-requests"]) == ("7", "7", "0s")
    assert (r.headers["x-ratelimit-limit-tokens"],
            r.headers["x-ratelimit-remaining-tokens"]) == ("1000", "1000")
    assert (await post_as(client, key, max_tokens=2)).status_code == 200  # 19 + 2 tokens
    r = await client.get("/v1/usage", headers=as_key)
    assert (r.headers["x-ratelimit-remaining-requests"],
            r.headers["x-ratelimit-remaining-tokens"]) == ("6", "979")
    r = await client.get("/v1/models")  # the admin key has no limits: no headers
    assert not any(name.startswith("x-ratelimit-") for name in r.headers)


async def test_a_key_restricted_to_some_models_gets_403_on_the_others(client, key_store):
    key, _ = key_store.create("narrow", models=["org/other"])
    r = await post_as(client, key, max_tokens=2)
    assert_error(r, 403, code="permission_denied", param="model")


# ---- /admin/ ------------------------------------------------------------------------------------

async def test_admin_routes_are_403_to_user_keys_and_401_without_one(client, key_store):
    user, _ = key_store.create("user")
    as_user = {"Authorization": f"Bearer {user}"}
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("PATCH", "/admin/keys/user"), ("DELETE", "/admin/keys/user"),
                         ("GET", "/admin/usage")):
        r = await client.request(method, path, headers=as_user, json={"name": "x"})
        assert_error(r, 403, code="permission_denied")
        r = await client.request(method, path, headers={"Authorization": ""})
        assert_error(r, 401, code="invalid_api_key")


async def test_admin_limits_beyond_what_the_store_holds_are_a_400(client):
    for body in ({"name": "rich", "budget": 10_000_000}, {"name": "fast", "rpm": 2**63},
                 {"name": "wide", "tpm": 2**63}):
        r = await client.post("/admin/keys", json=body)
        assert_error(r, 400, code="invalid_value")
    assert (await client.post("/admin/keys", json={"name": "ok", "budget": 9_000_000,
                                                   "rpm": 2**63 - 1})).status_code == 200
    r = await client.patch("/admin/keys/ok", json={"budget": 1e8})
    assert_error(r, 400, code="invalid_value")


async def test_admin_creates_changes_and_revokes_a_key_that_counts_at_once(client, key_store):
    made = (await client.post("/admin/keys", json={"name": "team", "rpm": 2,
                                                   "budget": "1.5", "models": [MODEL]})).json()
    key = made.pop("key")
    assert key.startswith("sk-tm-") and made["display"] == f"{key[:10]}...{key[-4:]}"
    assert (made["name"], made["rpm"], made["budget"], made["models"], made["status"]) == (
        "team", 2, 1.5, [MODEL], "active")
    assert (await post_as(client, key, max_tokens=2)).status_code == 200
    changed = (await client.patch("/admin/keys/team", json={"rpm": None, "tpm": 500})).json()
    assert (changed["rpm"], changed["tpm"], changed["budget"]) == (None, 500, 1.5)
    listed = (await client.get("/admin/keys")).json()["data"]
    assert [(k["name"], k["admin"]) for k in listed] == [("admin", True), ("team", False)]
    assert listed[1]["spend"] > 0
    assert (await client.delete("/admin/keys/team")).json()["status"] == "revoked"
    assert_error(await post_as(client, key, max_tokens=2), 401, code="invalid_api_key")
    assert_error(await client.delete("/admin/keys/nobody"), 404)
    assert_error(await client.post("/admin/keys", json={"name": "team"}), 400)


async def test_admin_usage_shows_every_key_with_totals_per_key_model_and_day(client, key_store):
    other, _ = key_store.create("other")
    mine = (await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))).json()
    theirs = (await post_as(client, other, max_tokens=2)).json()
    usage = (await client.get("/admin/usage")).json()
    assert [(r["id"], r["key"]) for r in usage["data"]] == [(mine["id"], "admin"),
                                                          (theirs["id"], "other")]
    cost = {"admin": mine["usage"]["estimated_cost"], "other": theirs["usage"]["estimated_cost"]}
    assert usage["by_key"] == cost
    assert usage["by_model"] == {MODEL: usage["total_cost"]}
    assert list(usage["by_day"].values()) == [usage["total_cost"]]
    only = (await client.get("/admin/usage", params={"key": "other"})).json()
    assert [r["id"] for r in only["data"]] == [theirs["id"]]
    assert_error(await client.get("/admin/usage", params={"key": "nobody"}), 404)


class ThreadRecordingLimiter(InProcessLimiter):
    """The in-process limiter, noting the thread of every call."""

    def __init__(self):
        super().__init__()
        self.threads: dict[str, set[int]] = {"reserve": set(), "finish": set(), "headers": set()}

    def reserve(self, *args):
        self.threads["reserve"].add(threading.get_ident())
        return super().reserve(*args)

    def finish(self, *args):
        self.threads["finish"].add(threading.get_ident())
        return super().finish(*args)

    def headers(self, *args):
        self.threads["headers"].add(threading.get_ident())
        return super().headers(*args)


async def test_the_limiter_is_never_called_on_the_event_loop(engine, key_store):
    """A Redis limiter is a network round trip (up to its timeout while Redis is down): on the
    event loop it would stall every request the server holds."""
    key, _ = key_store.create("limited", rpm=100, tpm=100_000)
    limiter = ThreadRecordingLimiter()
    c, _ = make_client(engine, key_store, limiter=limiter)
    c.headers["Authorization"] = f"Bearer {key}"
    async with c:
        assert (await c.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status_code \
            == 200
        streamed = await c.post("/v1/chat/completions", json=chat_body(max_tokens=2, stream=True))
        assert streamed.status_code == 200
        assert (await c.get("/v1/models")).headers["x-ratelimit-limit-requests"] == "100"
    loop_thread = threading.get_ident()
    assert all(limiter.threads.values()), limiter.threads  # each kind of call was made
    assert not any(loop_thread in threads for threads in limiter.threads.values())


async def test_a_stream_left_before_its_body_started_hands_its_reservation_back_off_the_loop(
        engine, key_store):
    """The client disconnects while the response's first bytes are still being sent: the body
    never starts, so `bill` never runs, and the close callback gives the reservation back, in a
    worker thread."""
    key, _ = key_store.create("leaves", tpm=100_000, budget_usd="1")
    key_id = key_store.ids_by_name()["leaves"]
    limiter = ThreadRecordingLimiter()
    _, app = make_client(engine, key_store, limiter=limiter)
    body = json.dumps(chat_body(max_tokens=4, stream=True)).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    started = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop()
        await started.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            started.set()
            await asyncio.Event().wait()  # the client never reads: blocked until cancelled

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("test", 80), "headers": [(b"authorization", f"Bearer {key}".encode()),
                                                 (b"content-type", b"application/json")]}
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    for _ in range(100):  # the hand-back runs in a worker thread, not awaited
        if limiter.usage(key_id).open == 0 and limiter.threads["finish"]:
            break
        await asyncio.sleep(0.05)
    usage = limiter.usage(key_id)
    assert (usage.open, usage.reserved_pico, usage.tokens) == (0, 0, 0)
    assert limiter.threads["finish"] and threading.get_ident() not in limiter.threads["finish"]
