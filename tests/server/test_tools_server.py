"""Tool calling end to end: a real `tokenmill serve` of the default model (SmolLM2-135M, generic
tool format: it cannot call tools by itself), driven by the official `openai` client and
LangChain's `bind_tools`. The grammar makes forced calls valid; `auto` lets it answer freely."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_live import MODEL_ID

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "required": ["zone"], "additionalProperties": False,
        "properties": {"zone": {"type": "string", "maxLength": 10}}}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed(chunks):
    """(content, {index: [id, name, arguments]}, finish_reason) of a chat stream."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or ():
                if d.id is not None:
                    assert d.index not in calls and d.function.arguments == ""
                    calls[d.index] = [d.id, d.function.name, ""]
                else:
                    assert d.function.name is None
                    calls[d.index][2] += d.function.arguments
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_and_stream_the_same_arguments(client, choice):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                  max_tokens=120, temperature=0)
    full = client.chat.completions.create(**kwargs)
    c = full.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None
    names = None if choice == "required" else {"get_time"}
    _check_calls(c.message.tool_calls, names)
    content, calls, finish = _streamed(client.chat.completions.create(stream=True, **kwargs))
    assert finish == "tool_calls" and content == ""
    assert [(n, a) for _, n, a in calls.values()] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


def test_single_call_without_parallel_tool_calls_and_sampled_choices(client):
    full = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, tools=TOOLS, tool_choice="required", n=3,
        parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=5)
    for c in full.choices:
        assert c.finish_reason == "tool_calls"
        assert len(c.message.tool_calls) == 1
        _check_calls(c.message.tool_calls)


def test_a_call_cut_by_max_tokens_says_length(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                  max_tokens=12, temperature=0)
    c = client.chat.completions.create(**kwargs).choices[0]
    assert c.finish_reason == "length"
    content, calls, finish = _streamed(client.chat.completions.create(stream=True, **kwargs))
    assert finish == "length"
    full_calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or ()]
    assert [(n, a) for _, n, a in calls.values()] == full_calls


@pytest.mark.parametrize("seed", range(4))
def test_auto_never_fails_and_what_it_returns_is_consistent(client, seed):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                  temperature=1.0, seed=seed, logprobs=True)
    c = client.chat.completions.create(**kwargs).choices[0]
    if c.message.tool_calls:
        assert c.finish_reason in ("tool_calls", "length")
        if c.finish_reason == "tool_calls":
            _check_calls(c.message.tool_calls)
    else:
        assert isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    assert c.logprobs.content  # every token's logprob, calls or not
    content, calls, _ = _streamed(client.chat.completions.create(stream=True, **kwargs))
    assert content == (c.message.content or "")
    assert [(n, a) for _, n, a in calls.values()] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls or ()]


def test_none_answers_in_text(client):
    c = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS,
                                       tool_choice="none", max_tokens=20, temperature=0)
    assert c.choices[0].message.tool_calls is None
    assert c.choices[0].finish_reason in ("stop", "length")


def test_a_tool_result_round_trip(client):
    first = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS,
                                           tool_choice="required", max_tokens=120,
                                           temperature=0)
    message = first.choices[0].message
    history = MESSAGES + [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
        for call in message.tool_calls]
    second = client.chat.completions.create(model=MODEL_ID, messages=history, tools=TOOLS,
                                            max_tokens=20, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object",
                                    "properties": {"a": {"type": "wat"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
])
def test_tool_errors_are_400s_naming_the_parameter(client, kw, param):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=5,
                                           stream=stream, **kw)
        err = e.value.body if isinstance(e.value.body, dict) else {}
        err = err.get("error", err)
        assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_langchain_bind_tools_gets_tool_calls(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL_ID, base_url=server.v1, api_key=server.key,
                                      max_tokens=120, temperature=0, max_retries=0, timeout=300)

    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city, in celsius or fahrenheit."""
        return "sunny"

    reply = llm.bind_tools([get_weather], tool_choice="required").invoke(
        "What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert set(reply.tool_calls[0]["args"]) <= {"city", "unit"}
