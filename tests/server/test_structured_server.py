"""Structured outputs end to end: a real `tokenmill serve` of the default model (135M parameters,
too small to write valid JSON by itself), driven by the official `openai` client (its
`chat.completions.parse` helper with pydantic models), raw HTTP for vLLM's guided_* extras, and
LangChain's `ChatOpenAI.with_structured_output`, unchanged."""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from server_live import MODEL_ID

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Invent a city and describe it."}]


class Landmark(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict mode wants
    name: str = Field(max_length=30)
    kind: Literal["museum", "park", "bridge", "tower"]


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=40_000_000)
    landmarks: list[Landmark] = Field(max_length=2)


def test_the_openai_parse_helper_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(model=MODEL_ID, messages=MESSAGES,
                                               response_format=City, max_tokens=200,
                                               temperature=0.7, seed=3)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_mode_returns_an_object_streamed_and_not(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=120, temperature=0,
                  response_format={"type": "json_object"})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    if full.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(streamed), dict)
    else:  # the object ran past max_tokens: cut, and said so
        assert full.choices[0].finish_reason == "length"


def test_sampled_outputs_validate_against_the_schema(client):
    schema = City.model_json_schema()
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "city", "schema": schema, "strict": True}}
    completion = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=4,
                                                max_tokens=200, temperature=1.0, seed=11,
                                                response_format=response_format)
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_max_tokens_cuts_with_length(client):
    completion = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=4, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "objekt"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(unclosed"}}}, "regex"),
])
def test_an_invalid_schema_is_a_400_naming_what_is_wrong(client, response_format, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=5,
                                       response_format=response_format)
    error = e.value.body
    assert error["param"] == "response_format" and error["code"] == "invalid_value"
    assert words in error["message"]


def test_guided_extras_on_completions(http):
    def complete(**extra) -> str:
        r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Answer: ",
                                               "max_tokens": 16, "temperature": 0.8, "seed": 5,
                                               **extra})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        return choice["text"]

    assert complete(guided_choice=["red", "green", "blue"]) in ("red", "green", "blue")
    code = "[A-Z][a-z]{2,5}-[0-9]{3}"
    assert re.fullmatch(code, complete(guided_regex=code))
    grammar = 'root ::= "(" num ("+" num)? ")"\nnum ::= [1-9] [0-9]?'
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)", complete(guided_grammar=grammar))
    json_text = complete(guided_json={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                      "required": ["ok"], "additionalProperties": False})
    assert json.loads(json_text) in ({"ok": True}, {"ok": False})


def test_a_bad_guided_grammar_is_a_400(http):
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 4,
                                           "guided_grammar": 'root ::= "a" ('})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "guided_grammar"


def test_constrained_tokens_are_billed_like_any_other(client, http):
    since = int(time.time()) - 1  # the shared server has served many requests before this one
    completion = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=60, temperature=0,
        response_format={"type": "json_object"})
    records = http.get("/v1/usage", params={"start": since, "limit": 1000}).json()["data"]
    record = next(r for r in records if r["id"] == completion.id)
    assert record["completion_tokens"] == completion.usage.completion_tokens > 0
    assert record["prompt_tokens"] == completion.usage.prompt_tokens


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL_ID, base_url=server.v1, api_key=server.key,
                                      max_tokens=200, temperature=0, max_retries=0, timeout=300)
    city = llm.with_structured_output(City, method="json_schema").invoke(
        "Invent a city and describe it.")
    assert isinstance(city, City)
