"""Tool calling through the chat templates: a conversation with an assistant tool call and its
result, shaped by the server (tokenmill/server/tool_requests.py) for each family's template,
renders exactly as that family's official format writes it, and as the family's own reference
template (reference_templates/) renders the same messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.catalog.templates import ChatTemplate
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.tool_formats import FORMATS, mistral_call_id
from tokenmill.server.tool_requests import template_messages

REFERENCES = Path(__file__).parent / "reference_templates"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
REQUEST = ChatCompletionRequest.model_validate({"model": "m", "tools": TOOLS, "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "21 C"}]})


def render(template: str, fmt: str, native: bool, req=REQUEST) -> str:
    messages, tools = template_messages(req, FORMATS[fmt], native)
    return ChatTemplate.builtin(template, "<s>", "</s>").render(messages, tools=tools)


@pytest.mark.parametrize("template, fmt, native, expected", [
    ('chatml', 'hermes', True,
    (
     '<|im_start|>system\n'
     'Be brief.\n'
     '\n'
     '# Tools\n'
     '\n'
     'You may call one or more functions to assist with the user query.\n'
     '\n'
     'You are provided with function signatures within <tools></tools> XML tags:\n'
     '<tools>\n'
     '{"type": "function", "function": {"name": "get_weather", "description": "Weather'
     '.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
     '</tools>\n'
     '\n'
     'For each function call, return a json object with function name and arguments wi'
     'thin <tool_call></tool_call> XML tags:\n'
     '<tool_call>\n'
     '{"name": <function-name>, "arguments": <args-json-object>}\n'
     '</tool_call><|im_end|>\n'
     '<|im_start|>user\n'
     'Weather in Paris?<|im_end|>\n'
     '<|im_start|>assistant\n'
     '<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call><|im_end|>\n'
     '<|im_start|>user\n'
     '<tool_response>\n'
     '21 C\n'
     '</tool_response><|im_end|>\n'
     '<|im_start|>assistant\n'
    )),
    ('llama3', 'llama3', True,
    (
     '<s><|start_header_id|>system<|end_header_id|>\n'
     '\n'
     'Environment: ipython\n'
     'Cutting Knowledge Date: December 2023\n'
     'Today Date: 26 Jul 2024\n'
     '\n'
     'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
     '\n'
     'Given the following functions, please respond with a JSON for a function call wi'
     'th its proper arguments that best answers the given prompt.\n'
     '\n'
     'Respond in the format {"name": function name, "parameters": dictionary of argume'
     'nt name and its value}.Do not use variables.\n'
     '\n'
     '{\n'
     '    "type": "function",\n'
     '    "function": {\n'
     '        "name": "get_weather",\n'
     '        "description": "Weather.",\n'
     '        "parameters": {\n'
     '            "type": "object",\n'
     '            "properties": {\n'
     '                "city": {\n'
     '                    "type": "string"\n'
     '                }\n'
     '            }\n'
     '        }\n'
     '    }\n'
     '}\n'
     '\n'
     'Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
     '\n'
     '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|><|start_header'
     '_id|>ipython<|end_header_id|>\n'
     '\n'
     '"21 C"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
     '\n'
    )),
    ('mistral', 'mistral', True,
    (
     '<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "'
     'description": "Weather.", "parameters": {"type": "object", "properties": {"city"'
     ': {"type": "string"}}}}}][/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST][TOOL_'
     'CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "Dtu2wsLGx'
     '"}]</s>[TOOL_RESULTS] {"content": 21 C, "call_id": "Dtu2wsLGx"}[/TOOL_RESULTS]'
    )),
    ('vicuna', 'generic', False,
    (
     '<s>Be brief.\n'
     '\n'
     'You can call the following functions:\n'
     '{"type": "function", "function": {"name": "get_weather", "description": "Weather'
     '.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
     '\n'
     'To call one or more of them, reply with only this, and nothing else:\n'
     '{"tool_calls": [{"name": "<function-name>", "arguments": <arguments-json-object>'
     '}]}\n'
     '\n'
     'Otherwise, answer normally. USER: Weather in Paris? ASSISTANT: {"tool_calls": [{'
     '"name": "get_weather", "arguments": {"city":"Paris"}}]}</s>USER: Result of get_w'
     'eather (call call_abc):\n'
     '21 C ASSISTANT:'
    )),
    ('chatml', 'generic', False,
    (
     '<|im_start|>system\n'
     'Be brief.\n'
     '\n'
     'You can call the following functions:\n'
     '{"type": "function", "function": {"name": "get_weather", "description": "Weather'
     '.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
     '\n'
     'To call one or more of them, reply with only this, and nothing else:\n'
     '{"tool_calls": [{"name": "<function-name>", "arguments": <arguments-json-object>'
     '}]}\n'
     '\n'
     'Otherwise, answer normally.<|im_end|>\n'
     '<|im_start|>user\n'
     'Weather in Paris?<|im_end|>\n'
     '<|im_start|>assistant\n'
     '{"tool_calls": [{"name": "get_weather", "arguments": {"city":"Paris"}}]}<|im_end|>\n'
     '<|im_start|>user\n'
     'Result of get_weather (call call_abc):\n'
     '21 C<|im_end|>\n'
     '<|im_start|>assistant\n'
    )),
])
def test_a_tool_round_trip_renders_in_the_family_format(template, fmt, native, expected):
    assert render(template, fmt, native) == expected


@pytest.mark.parametrize("template, fmt, reference", [
    ("chatml", "hermes", "qwen2.5_7b_instruct.jinja"),
    ("llama3", "llama3", "llama3.3_70b_instruct.jinja"),
    ("mistral", "mistral", "mistral_7b_instruct_v0.3.jinja"),
])
def test_the_checkpoints_own_templates_render_the_same(template, fmt, reference):
    own = ChatTemplate("checkpoint", {"default": (REFERENCES / reference).read_text()},
                       {"bos_token": "<s>", "eos_token": "</s>"})
    messages, tools = template_messages(REQUEST, FORMATS[fmt], native=True)
    assert own.render(messages, tools=tools) == render(template, fmt, True)


def test_mistral_call_ids_are_nine_alphanumerics_and_stable():
    ids = {mistral_call_id(f"call_{i}") for i in range(100)}
    assert len(ids) == 100 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert mistral_call_id("call_abc") == mistral_call_id("call_abc")


def test_without_tools_in_the_request_tool_messages_pass_as_they_are():
    req = REQUEST.model_copy(update={"tools": None})
    messages, tools = template_messages(req, FORMATS["generic"], native=False)
    assert tools is None and messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2] == {"role": "assistant", "content": (
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city":"Paris"}}]}')}
    assert messages[3] == {"role": "tool", "content": "21 C"}


def test_tool_choice_none_leaves_the_generic_description_out():
    req = REQUEST.model_copy(update={"tool_choice": "none"})
    messages, _ = template_messages(req, FORMATS["generic"], native=False)
    assert messages[0] == {"role": "system", "content": "Be brief."}
