"""Structured outputs in the engine, on the real default model (135M parameters: too small to
write valid JSON by itself, so only the grammar makes these outputs valid).

The grammar compiler (caching, errors), then whole generations: sampled outputs validate against
a nested schema, JSON mode parses, regex and choice hold, a free request beside constrained ones
gets the tokens it gets alone, n > 1 and preemption keep each choice's grammar right, max_tokens
cuts with "length", and min_tokens cannot keep a complete grammar from ending.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill.engine.structured import GrammarCompiler, GrammarError
from tokenmill.sampling_params import SamplingParams, StructuredOutputs
from tests.engine.test_llm_engine import chat_ids, make_engine, run, tight_engine

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "nickname": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
PROMPT = "Describe a person as JSON."
DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"  # \\d: any Unicode digit, in Rust regex as in Python
GBNF = 'root ::= pair pair? "!"\npair ::= "ab" | "cd"'


@pytest.fixture(scope="module")
def engine(loaded_default_model, default_model_path):
    return make_engine(loaded_default_model, default_model_path)


@pytest.fixture(scope="module")
def prompt(engine):
    return chat_ids(engine.tokenizer, PROMPT)


def texts(results: dict[str, dict]) -> dict[str, str]:
    return {rid: r["text"] for rid, r in results.items()}


# ---- the compiler ---------------------------------------------------------------------------


def test_equal_constraints_compile_once(engine):
    a = engine.grammars.compile(StructuredOutputs.json_schema({"type": "object", "a": 1}))
    b = engine.grammars.compile(StructuredOutputs.json_schema({"a": 1, "type": "object"}))
    assert a is b  # canonical JSON: the key order does not matter
    grammar = engine.grammars.grammar(StructuredOutputs.json_schema({"type": "object"}))
    assert grammar.matcher is not engine.grammars.compile(
        StructuredOutputs.json_schema({"type": "object"}))


@pytest.mark.parametrize("spec, words", [
    (StructuredOutputs("json_schema", '{"type": "objekt"}'), "objekt"),
    (StructuredOutputs("json_schema", "{not json"), "not a JSON Schema object"),
    (StructuredOutputs("json_schema", "false"), "not a JSON Schema object"),
    (StructuredOutputs("json_schema", '{"type": "string", "pattern": "[a-"}'),
     "unclosed character class"),
    (StructuredOutputs("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}'),
     "minLength (5) is greater than maxLength (2)"),
    (StructuredOutputs("regex", "a(b"), "regex"),
    (StructuredOutputs("lark", "start: undefined_rule"), "undefined_rule"),
    (StructuredOutputs("gbnf", 'root ::= "a" ('), "GBNF"),
    (StructuredOutputs("gbnf", "root ::= undefined"), "undefined"),
    (StructuredOutputs.choice([]), "at least one choice"),
])
def test_a_constraint_that_does_not_compile_raises_a_grammar_error_naming_it(engine, spec, words):
    with pytest.raises(GrammarError, match=re.escape(words)):
        engine.grammars.compile(spec)


def test_a_bad_constraint_leaves_nothing_in_the_engine(engine, prompt):
    params = SamplingParams(structured=StructuredOutputs("regex", "a(b"))
    with pytest.raises(GrammarError):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


def test_the_compiler_masks_the_model_vocabulary(engine):
    compiler = GrammarCompiler(engine.tokenizer, 49152, (2,))
    assert compiler.ll_tokenizer.vocab_size == 49152


# ---- generation -----------------------------------------------------------------------------


def test_twenty_sampled_outputs_validate_against_a_nested_schema(engine, prompt):
    structured = StructuredOutputs.json_schema(NESTED_SCHEMA)
    requests = {f"s{seed}": (prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=160,
                                                    structured=structured))
                for seed in range(20)}
    results = run(engine, requests)
    for rid, result in results.items():
        assert result["finish"] == "stop", (rid, result["text"])
        jsonschema.validate(json.loads(result["text"]), NESTED_SCHEMA)


def test_json_mode_output_parses_as_an_object(engine, prompt):
    structured = StructuredOutputs.json_schema({"type": "object"})
    requests = {f"j{seed}": (prompt, SamplingParams(temperature=0.8, seed=seed, max_tokens=200,
                                                    structured=structured))
                for seed in range(4)}
    for result in run(engine, requests).values():
        if result["finish"] == "stop":
            assert isinstance(json.loads(result["text"]), dict)
        else:  # an object may run past max_tokens: then it is cut, and says so
            assert result["finish"] == "length"


def test_regex_and_choice_constraints_hold(engine, prompt):
    requests = {
        "date": (prompt, SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                                        structured=StructuredOutputs("regex", DATE))),
        "pick": (prompt, SamplingParams(temperature=1.0, seed=2, max_tokens=20,
                                        structured=StructuredOutputs.choice(["yes", "no",
                                                                             "maybe so"]))),
        "gbnf": (prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                                        structured=StructuredOutputs("gbnf", GBNF))),
    }
    results = run(engine, requests)
    assert re.fullmatch(DATE, results["date"]["text"])
    assert results["pick"]["text"] in ("yes", "no", "maybe so")
    assert re.fullmatch(r"(ab|cd){1,2}!", results["gbnf"]["text"])
    assert all(r["finish"] == "stop" for r in results.values())


def test_a_free_request_beside_three_constrained_ones_gets_the_tokens_it_gets_alone(engine,
                                                                                    prompt):
    free = {"free": (prompt, SamplingParams(temperature=0.9, seed=7, max_tokens=24)),
            "greedy": (prompt, SamplingParams(temperature=0.0, max_tokens=24))}
    alone = run(engine, free)
    structured = StructuredOutputs.json_schema(NESTED_SCHEMA)
    crowd = {f"c{i}": (prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=24,
                                              structured=structured)) for i in range(3)}
    together = run(engine, {**free, **crowd})
    for rid in free:
        assert together[rid]["tokens"] == alone[rid]["tokens"]


def test_every_choice_of_n_keeps_its_own_grammar(engine, prompt):
    structured = StructuredOutputs.json_schema(NESTED_SCHEMA)
    results = run(engine, {"n": (prompt, SamplingParams(n=4, temperature=1.0, seed=3,
                                                        max_tokens=160, structured=structured))})
    assert len(results) == 4
    outputs = [json.loads(r["text"]) for r in results.values()]
    for output in outputs:
        jsonschema.validate(output, NESTED_SCHEMA)
    assert len({json.dumps(o) for o in outputs}) > 1  # four draws, not one copied


def test_preemption_keeps_the_grammar_state(loaded_default_model, default_model_path, prompt):
    structured = StructuredOutputs.json_schema(NESTED_SCHEMA)
    requests = {f"p{i}": (prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=120,
                                                 structured=structured)) for i in range(6)}
    expected = run(make_engine(loaded_default_model, default_model_path), requests)
    # 24 blocks of 16 tokens: six prompts of ~35 tokens cannot all grow to ~100 tokens at once.
    tight, preempted = tight_engine(loaded_default_model, default_model_path)
    got = run(tight, requests)
    assert preempted, "the tight cache should have forced a preemption"
    assert texts(got) == texts(expected)
    for result in got.values():
        jsonschema.validate(json.loads(result["text"]), NESTED_SCHEMA)


def test_max_tokens_cuts_a_constrained_output_with_length(engine, prompt):
    structured = StructuredOutputs.json_schema(NESTED_SCHEMA)
    result = run(engine, {"cut": (prompt, SamplingParams(temperature=0.0, max_tokens=5,
                                                         structured=structured))})["cut"]
    assert result["finish"] == "length"
    assert len(result["tokens"]) == 5
    assert result["text"].startswith("{")


def test_min_tokens_cannot_keep_a_complete_grammar_from_ending(engine, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=10,
                            structured=StructuredOutputs.choice(["yes", "no"]))
    result = run(engine, {"short": (prompt, params)})["short"]
    assert result["text"] in ("yes", "no")
    assert result["finish"] == "stop"


def test_ignore_eos_still_ends_when_the_grammar_is_complete(engine, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                            structured=StructuredOutputs.choice(["yes", "no"]))
    result = run(engine, {"eos": (prompt, params)})["eos"]
    assert result["text"] in ("yes", "no")
    assert result["finish"] == "stop"


def test_aborting_a_constrained_request_midway_leaves_the_others_valid(engine, prompt):
    structured = StructuredOutputs.json_schema(NESTED_SCHEMA)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=160, structured=structured)
    engine.add_request("gone", prompt, params)
    engine.add_request("kept", prompt, params)
    kept = ""
    for _ in range(6):
        kept += "".join(o.text for o in engine.step() if o.request_id == "kept")
    assert [o.finish_reason for o in engine.abort("gone")] == ["abort"]
    engine.check_integrity()
    while engine.has_unfinished_requests():
        kept += "".join(o.text for o in engine.step() if o.request_id == "kept")
    jsonschema.validate(json.loads(kept), NESTED_SCHEMA)
    assert engine.scheduler.kv_cache_usage == 0.0
