"""Each family's tool-call parser on recorded model outputs (malformed ones included), the
streaming extractor fed every split of them, and the grammars against the default model's
tokenizer."""

from __future__ import annotations

import json

import pytest

from tokenmill.catalog.catalog import TOOL_FORMATS
from tokenmill.server.tool_formats import FORMATS, GENERIC, HERMES, LLAMA3, MISTRAL
from tokenmill.server.tool_stream import ToolCallExtractor, fold, parse

WEATHER = '{"city": "Paris", "unit": "celsius"}'
# (format, what the model wrote, content, [(name, arguments)])
RECORDED = [
    # Qwen2.5-7B-Instruct: text, then two calls
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + WEATHER
     + '}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
     '</tool_call>', "Let me check.\n",
     [("get_weather", WEATHER), ("get_time", '{"zone": "CET"}')]),
    (HERMES, '<tool_call>\n{"name": "f", "arguments": {"s": "a } \\" {"}}\n</tool_call>', None,
     [("f", '{"s": "a } \\" {"}')]),
    (HERMES, "Paris is sunny, 21 C.", "Paris is sunny, 21 C.", []),
    (HERMES, "a <tool_call is not a marker", "a <tool_call is not a marker", []),
    # Llama-3.3-70B-Instruct (<|python_tag|> is a special token, skipped from the text)
    (LLAMA3, '{"name": "get_weather", "parameters": ' + WEATHER + '}', None,
     [("get_weather", WEATHER)]),
    (LLAMA3, '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1, {}]}}', None,
     [("a", "{}"), ("b", '{"x": [1, {}]}')]),
    (LLAMA3, 'The answer is {"name": "a"}.', 'The answer is {"name": "a"}.', []),
    # Mistral-7B-Instruct-v0.3, with [TOOL_CALLS] kept and skipped
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + WEATHER + '}]', None,
     [("get_weather", WEATHER)]),
    (MISTRAL, ' [{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]', None,
     [("a", '{"q": 1}'), ("b", "{}")]),
    (MISTRAL, "Sure [1] is a citation.", "Sure [1] is a citation.", []),
    # SmolLM2 under the generic format's grammar (compact arguments)
    (GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city":"Paris"}}]}', None,
     [("get_weather", '{"city":"Paris"}')]),
    (GENERIC, "I cannot call tools.", "I cannot call tools.", []),
]
MALFORMED = [
    (HERMES, 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1'),  # never closes
    (HERMES, "<tool_call>\nnot json at all\n</tool_call>"),  # no call in the region
    (HERMES, '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>'),  # a string
    (LLAMA3, '{"name": "f", "parameters": {"x": [1, 2}'),
    (LLAMA3, '{"name": get_weather}'),
    (MISTRAL, "[TOOL_CALLS] oops"),
    (GENERIC, '{"tool_calls": [{"name": "f"'),
    (GENERIC, '{"answer": 42}'),
]


def _calls(parsed):
    return [(c.name, c.arguments) for c in parsed.calls]


@pytest.mark.parametrize("fmt, text, content, calls", RECORDED)
def test_recorded_outputs_parse(fmt, text, content, calls):
    parsed = parse(fmt, text)
    assert parsed.content == content and _calls(parsed) == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 and c.id[5:].isalnum()
               for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


@pytest.mark.parametrize("fmt, text", MALFORMED)
def test_malformed_calls_come_back_as_content(fmt, text):
    parsed = parse(fmt, text)
    assert parsed.content == text and parsed.calls == []


def test_a_call_cut_by_max_tokens_keeps_what_was_written():
    parsed = parse(HERMES, 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1', cut=True)
    assert parsed.content == "Sure.\n" and _calls(parsed) == [("f", '{"x": 1')]
    assert not parsed.complete
    # cut before the name was complete: no call, and the marker's text is held back (a stream
    # never sent it): the text before it is the content
    parsed = parse(HERMES, 'Sure.\n<tool_call>\n{"na', cut=True)
    assert parsed.content == 'Sure.\n<tool_call>\n{"na' and parsed.calls == []


@pytest.mark.parametrize("fmt, text, content, calls",
                         RECORDED + [(f, t, None, None) for f, t in MALFORMED])
def test_every_split_streams_to_the_same_result(fmt, text, content, calls):
    """Fed in three pieces at every pair of cut points, the deltas reassemble to `parse`, and
    every call's first delta comes before its arguments."""
    whole = parse(fmt, text, cut=True)  # as a stream, nothing is taken back
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            extractor = ToolCallExtractor(fmt)
            deltas = []
            for piece in (text[:i], text[i:j], text[j:]):
                deltas += extractor.feed(piece)
            deltas += extractor.finish()
            streamed = fold(deltas)
            assert streamed.content == whole.content and _calls(streamed) == _calls(whole), \
                (i, j)


def test_content_is_never_sent_while_it_could_be_a_marker():
    extractor = ToolCallExtractor(HERMES)
    assert extractor.feed("Hi <tool") == ["Hi "]
    assert extractor.feed("_ca") == []
    assert extractor.feed("ll>\n{\"name\": \"f\"") == []
    start, args = extractor.feed(', "arguments": {"a"')
    assert (start.index, start.name, args.text) == (0, "f", '{"a"')
    llama = ToolCallExtractor(LLAMA3)
    assert llama.feed("  {") == [] and llama.feed("x") == ["  {x"]


# ---- the grammars, against the default model's tokenizer ------------------------------------

FUNCTIONS = [
    {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string"}}}},
    {"name": "get_time"},  # no parameters: an empty object
]


@pytest.fixture(scope="module")
def matcher(real_tokenizer):
    import llguidance
    import llguidance.hf

    ll = llguidance.hf.from_tokenizer(real_tokenizer, n_vocab=49152,
                                      eos_token=[real_tokenizer.eos_token_id])

    def accepts(grammar: str, text: str) -> bool:
        m = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar),
                                 log_level=0)
        assert not m.is_error(), m.get_error()
        for token in real_tokenizer.encode(text, add_special_tokens=False):
            if not m.consume_token(token):
                return False
        return m.is_accepting()

    return accepts


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_grammars_force_well_formed_calls(matcher, fmt):
    one = fmt.calls_text([("get_weather", '{"city":"Paris"}')])
    two = fmt.calls_text([("get_weather", '{"city":"Paris"}'), ("get_time", "{}")])
    required = fmt.grammar(FUNCTIONS, parallel=False, allow_text=False)
    parallel = fmt.grammar(FUNCTIONS, parallel=True, allow_text=False)
    auto = fmt.grammar(FUNCTIONS, parallel=True, allow_text=True)
    assert matcher(required, one) and not matcher(required, two)
    assert matcher(parallel, one) and matcher(parallel, two)
    assert matcher(auto, two) and matcher(auto, "It is sunny.")
    assert not matcher(required, "It is sunny.")
    # arguments follow the schema, compactly; the name is one of the functions
    assert not matcher(required, fmt.calls_text([("get_weather", '{"town":"Paris"}')]))
    assert not matcher(required, fmt.calls_text([("get_weather", '{"city": "Paris"}')]))
    assert not matcher(required, fmt.calls_text([("get_time", '{"x":1}')]))
    assert not matcher(required, fmt.calls_text([("nope", "{}")]))
    named = fmt.grammar(FUNCTIONS[1:], parallel=True, allow_text=False)
    assert not matcher(named, one)
    for text in (one, two):  # what the grammar writes is what the parser reads
        assert json.loads(parse(fmt, text).calls[0].arguments) == {"city": "Paris"}


def test_mistral_writes_its_control_token_when_the_tokenizer_has_one():
    class Tokenizer:
        def get_vocab(self):
            return {"[TOOL_CALLS]": 5}

    assert "calls: <[5]> \" [\" call" in MISTRAL.grammar(FUNCTIONS, True, False, Tokenizer())
    assert 'calls: "[TOOL_CALLS]" " [" call' in MISTRAL.grammar(FUNCTIONS, True, False, None)


def test_every_catalog_tool_format_has_a_format_and_no_other():
    assert sorted(FORMATS) == sorted(TOOL_FORMATS)
