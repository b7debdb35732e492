"""Chat templates against transformers' apply_chat_template, the reference renderer.

Each built-in is rendered next to its family's reference template (reference_templates/, sources
in each file's header: the official templates, and for WizardLM-2, which ships none, FastChat's
Vicuna format, itself checked against FastChat below) set on a copy of the real SmolLM2 tokenizer,
with the family's BOS and EOS passed to both sides; the strings must be equal, byte for byte.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jinja2
import pytest

from tokenmill.catalog.templates import BUILTIN_TEMPLATES, ChatTemplate, TemplateError
from tokenmill.llm import LLM
from tokenmill.prompts import render_chat
from tokenmill.sampling_params import SamplingParams

REFERENCES = Path(__file__).parent / "reference_templates"

# ---- conversations ----------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You answer in one sentence <b>&</b> never in French."}
CHAT = [
    {"role": "user", "content": "  Hi, what's Paris' population?  "},
    {"role": "assistant", "content": " About 2.1 million — in 2023. "},
    {"role": "user", "content": "And Zürich's?"},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather in a city (°C) <not HTML> & \"quoted\"",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "City name"},
                                  "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOLS = [WEATHER, TIME]


def call(call_id: str, name: str, **arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


ONE_CALL = [  # user -> one tool call -> its result -> answer -> next question
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [call("a1B2c3D4e", "get_weather",
                                                                city="Zürich", unit="c")]},
    {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather",
     "content": '{"temperature": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21 °C and clear in Zürich."},
    {"role": "user", "content": "Thanks! And in Oslo?"},
]
TWO_CALLS = [  # parallel calls, two consecutive results
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "content": "Let me check.",
     "tool_calls": [call("X9y8Z7w6v", "get_weather", city="Oslo"),
                    call("k5L4m3N2o", "get_time", city="Oslo")]},
    {"role": "tool", "tool_call_id": "X9y8Z7w6v", "content": "4 C, snow"},
    {"role": "tool", "tool_call_id": "k5L4m3N2o", "content": "14:05"},
]

LLAMA3 = ("llama3", "llama3.3_70b_instruct.jinja", "<|begin_of_text|>", "<|eot_id|>")
MISTRAL = ("mistral", "mistral_7b_instruct_v0.3.jinja", "<s>", "</s>")
QWEN2 = ("chatml", "qwen2_72b_instruct.jinja", None, "<|im_end|>")
QWEN25 = ("chatml", "qwen2.5_7b_instruct.jinja", None, "<|im_end|>")
OPENHERMES = ("chatml", "openhermes_2.5_mistral_7b.jinja", "<s>", "<|im_end|>")
VICUNA = ("vicuna", "wizardlm2_vicuna_v1.1.jinja", "<s>", "</s>")
QWEN2_SYSTEM = {"default_system_message": "You are a helpful assistant."}  # chatml's kwarg

# (family, messages, tools, template kwargs): every built-in against its reference
CASES = {
    "llama3-system": (LLAMA3, [SYSTEM, *CHAT], None, {}),
    "llama3-no-system": (LLAMA3, CHAT, None, {}),
    "llama3-tools-in-user-message": (LLAMA3, [SYSTEM, *ONE_CALL], TOOLS, {}),
    "llama3-tools-in-system": (LLAMA3, ONE_CALL, TOOLS, {"tools_in_user_message": False}),
    "llama3-date-and-tool-result-object": (
        LLAMA3, [*ONE_CALL[:2], {"role": "tool", "content": {"temperature": 21}}], TOOLS,
        {"date_string": "01 Feb 2025"}),
    "llama3-builtin-tools": (
        LLAMA3, [{"role": "user", "content": "Search the news"},
                 {"role": "assistant", "tool_calls": [call("", "brave_search", query="news")]},
                 {"role": "ipython", "content": "[results]"}], None,
        {"builtin_tools": ["brave_search", "code_interpreter"]}),
    "mistral-system": (MISTRAL, [SYSTEM, *CHAT], None, {}),
    "mistral-no-system": (MISTRAL, CHAT, None, {}),
    "mistral-tools": (MISTRAL, [SYSTEM, *ONE_CALL], TOOLS, {}),
    "mistral-parallel-calls": (MISTRAL, TWO_CALLS, TOOLS, {}),
    "chatml-qwen2-system": (QWEN2, [SYSTEM, *CHAT], None, QWEN2_SYSTEM),
    "chatml-qwen2-default-system": (QWEN2, CHAT, None, QWEN2_SYSTEM),
    "chatml-qwen2-empty-system": (QWEN2, [{"role": "system", "content": ""}, *CHAT], None,
                                  QWEN2_SYSTEM),
    "chatml-qwen2.5-tools": (QWEN25, [SYSTEM, *ONE_CALL], TOOLS, {}),
    "chatml-qwen2.5-parallel-calls": (QWEN25, [SYSTEM, *TWO_CALLS], TOOLS, {}),
    "chatml-qwen2.5-tool-history-without-tools": (QWEN25, [SYSTEM, *TWO_CALLS], None, {}),
    "chatml-openhermes-system": (OPENHERMES, [SYSTEM, *CHAT], None, {}),
    "chatml-openhermes-no-system": (OPENHERMES, CHAT, None, {}),
    "vicuna-system": (VICUNA, [SYSTEM, *CHAT], None, {}),
    "vicuna-default-system": (VICUNA, CHAT, None, {}),
    "vicuna-one-question": (VICUNA, CHAT[:1], None, {}),
}


@pytest.fixture
def with_template(real_tokenizer):
    """with_template(source) -> a copy of the real tokenizer whose chat template is `source`."""
    def make(source):
        tokenizer = copy.copy(real_tokenizer)
        tokenizer.chat_template = source
        return tokenizer
    return make


def reference(with_template, family, messages, tools, add_generation_prompt, kwargs) -> str:
    _, reference_file, bos, eos = family
    tokenizer = with_template((REFERENCES / reference_file).read_text(encoding="utf-8"))
    tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **tokens, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_builtin_renders_like_the_reference_template(with_template, case, add_generation_prompt):
    family, messages, tools, kwargs = CASES[case]
    builtin, _, bos, eos = family
    expected = reference(with_template, family, messages, tools, add_generation_prompt, kwargs)
    got = ChatTemplate.builtin(builtin, bos, eos).render(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected


def test_every_builtin_has_reference_cases():
    assert {family[0] for family, *_ in CASES.values()} == set(BUILTIN_TEMPLATES)


# (family, messages, tools, the reference's own raise_exception message)
REFUSALS = {
    "llama3-two-calls": (LLAMA3, TWO_CALLS, TOOLS,
                         "This model only supports single tool-calls at once!"),
    "mistral-roles-not-alternating": (
        MISTRAL, [CHAT[0], CHAT[2]], None, "After the optional system message, conversation "
        "roles must alternate user/assistant/user/assistant/..."),
    "mistral-openai-call-id": (
        MISTRAL, [ONE_CALL[0], {"role": "assistant", "tool_calls": [
            call("call_abc123def456", "get_weather", city="Oslo")]}], TOOLS,
        "Tool call IDs should be alphanumeric strings with length 9!"),
    "mistral-second-system-message": (
        MISTRAL, [SYSTEM, CHAT[0], SYSTEM], None, "Only user and assistant roles are supported, "
        "with the exception of an initial optional system message!"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_builtin_refuses_what_the_reference_refuses(with_template, case):
    family, messages, tools, message = REFUSALS[case]
    with pytest.raises(jinja2.TemplateError) as refused:
        reference(with_template, family, messages, tools, True, {})
    assert str(refused.value) == message
    with pytest.raises(TemplateError) as ours:
        ChatTemplate.builtin(family[0], family[2], family[3]).render(messages, tools=tools)
    assert str(ours.value) == message


def test_vicuna_refuses_tools_tool_calls_and_tool_messages():
    vicuna = ChatTemplate.builtin("vicuna", "<s>", "</s>")
    with pytest.raises(TemplateError, match=r"^This model's chat template \(vicuna\) does not "
                                            r"support tools\.$"):
        vicuna.render(CHAT, tools=TOOLS)
    with pytest.raises(TemplateError, match=r"does not support tool calls\.$"):
        vicuna.render(ONE_CALL[:2])
    with pytest.raises(TemplateError, match=r"then user and assistant messages; got a tool "
                                            r"message\.$"):
        vicuna.render([CHAT[0], {"role": "tool", "content": "4 C"}])


def fastchat_vicuna_v11(messages: list[dict], add_generation_prompt: bool) -> str:
    """FastChat's `vicuna_v1.1` Conversation.get_prompt() (SeparatorStyle.ADD_COLON_TWO), the
    format WizardLM-2's model card names, transcribed from lm-sys/FastChat."""
    system = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns = [(("USER", "ASSISTANT")[i % 2], m["content"]) for i, m in enumerate(messages)]
    if add_generation_prompt:
        turns.append(("ASSISTANT", None))
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(turns):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [[SYSTEM, *CHAT], CHAT, CHAT[:2]])
def test_vicuna_reference_is_fastchats_prompt(with_template, messages, add_generation_prompt):
    """The WizardLM-2 reference is itself checked against FastChat (after the BOS it writes)."""
    rendered = reference(with_template, VICUNA, messages, None, add_generation_prompt, {})
    assert rendered == "<s>" + fastchat_vicuna_v11(messages, add_generation_prompt)


# ---- the checkpoint's own template, and for_tokenizer's choice -------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [[SYSTEM, *CHAT], CHAT])
def test_checkpoint_template_renders_like_transformers(real_tokenizer, messages,
                                                       add_generation_prompt):
    template = ChatTemplate.for_tokenizer(real_tokenizer)
    assert template.name == "checkpoint"
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == \
        real_tokenizer.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)


def test_render_chat_encodes_like_transformers(real_tokenizer):
    template = ChatTemplate.for_tokenizer(real_tokenizer)
    expected = real_tokenizer.apply_chat_template([SYSTEM, *CHAT], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False)
    assert render_chat(template, real_tokenizer, [SYSTEM, *CHAT]) == expected


def test_own_template_wins_over_the_fallback(real_tokenizer):
    template = ChatTemplate.for_tokenizer(real_tokenizer, fallback="llama3")
    assert template.name == "checkpoint"
    assert template.render(CHAT) == real_tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)


def test_fallback_builtin_when_the_checkpoint_has_none(with_template):
    tokenizer = with_template(None)
    template = ChatTemplate.for_tokenizer(tokenizer, fallback="vicuna")
    assert template.name == "vicuna"
    # rendered with the tokenizer's own BOS and EOS (SmolLM2's)
    assert template.render(CHAT[:2], add_generation_prompt=False) == (
        "<|im_start|>A chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions. USER:   "
        "Hi, what's Paris' population?   ASSISTANT:  About 2.1 million — in 2023. <|im_end|>")
    assert ChatTemplate.for_tokenizer(tokenizer) is None


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_named_templates_pick_tool_use_with_tools(with_template, tools):
    tokenizer = with_template({"default": "plain:{{ messages | length }}",
                               "tool_use": "tools:{{ tools | length }}"})
    expected = tokenizer.apply_chat_template(CHAT, tools=tools, tokenize=False)
    assert expected == ("plain:3" if tools is None else "tools:2")
    assert ChatTemplate.for_tokenizer(tokenizer).render(CHAT, tools=tools) == expected


def test_unknown_builtin_and_broken_templates_fail_at_load(with_template):
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'; the built-in ones are "
                                         "llama3, mistral, chatml, vicuna"):
        ChatTemplate.builtin("alpaca", "<s>", "</s>")
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate.for_tokenizer(with_template("{% for m in messages %}"))
    with pytest.raises(ValueError, match="has no 'default'"):
        ChatTemplate.for_tokenizer(with_template({"tool_use": "x"}))


# ---- the environment: transformers' globals and filters, and the sandbox ----------------------

ENVIRONMENT = {
    "tojson": "{{ messages[0] | tojson }}|{{ tools | tojson(indent=2) }}|"
              "{{ {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':'), sort_keys=true) }}",
    "special-tokens-and-kwargs": "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ flavour }}",
    "none-valued-keys-dropped": "{% for m in messages %}{{ 'tool_calls' in m }},{% endfor %}",
    "documents-default-none": "{{ documents is none }}|{{ add_generation_prompt }}",
    "loop-controls": "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
                     "{{ m.role }}{% if loop.index0 == 2 %}{% break %}{% endif %}{% endfor %}",
    "namespace-and-dict": "{% set ns = namespace(n=0) %}{% for m in messages %}"
                          "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
                          "{{ dict(a=1) | tojson }}{{ dict.fromkeys(['x']) | tojson }}",
    "generation-block": "{% for m in messages %}{% generation %}[{{ m.role }}]{% endgeneration %}"
                        "{% endfor %}",
    "strftime-now": "{{ strftime_now('%Y') }}",
    "unsafe-attribute-reads-as-undefined": "[{{ messages.__class__ }}{{ tools.pop }}]",
    "whitespace-control": "{% for m in messages %}\n  {% if m.role == 'user' %}\n"
                          "{{ m.role }}\n  {% endif %}\n{% endfor %}",
}


@pytest.mark.parametrize("name", ENVIRONMENT)
def test_environment_matches_transformers(with_template, name):
    messages = [{"role": "system", "content": "Ünï <&>", "tool_calls": None}, *ONE_CALL[:3]]
    tokenizer = with_template(ENVIRONMENT[name])
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                             add_generation_prompt=True, flavour="vanilla")
    template = ChatTemplate.for_tokenizer(tokenizer)
    assert template.render(messages, tools=TOOLS, flavour="vanilla") == expected


@pytest.mark.parametrize("source, message", [
    ("{{ raise_exception('No ' + messages[0].role + ' messages, please.') }}",
     "No user messages, please."),
    ("{{ messages[0].nope.deeper }}",
     "the chat template failed: 'dict object' has no attribute 'nope'"),
    ("{{ messages[0].content + 1 }}",
     'the chat template failed: TypeError: can only concatenate str (not "int") to str'),
])
def test_template_failures_become_template_errors(with_template, source, message):
    with pytest.raises(TemplateError) as refused:
        ChatTemplate.for_tokenizer(with_template(source)).render(CHAT)
    assert str(refused.value) == message


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ namespace(__dict__=1) }}",
    "{{ messages.append({'role': 'system'}) }}",
    "{{ messages[0].update(role='system') }}",
])
def test_sandbox_escapes_are_refused(with_template, source):
    with pytest.raises(TemplateError, match="the chat template failed: .*unsafe|underscore"):
        ChatTemplate.for_tokenizer(with_template(source)).render(CHAT)


def test_empty_conversation_is_refused(real_tokenizer):
    with pytest.raises(TemplateError, match="^the conversation is empty$"):
        ChatTemplate.for_tokenizer(real_tokenizer).render([])


# ---- the offline API -------------------------------------------------------------------------


def test_llm_chat_uses_the_builtin_fallback_or_refuses(tiny_llama_dir):
    """tiny_llama_dir's tokenizer has no chat template of its own."""
    with pytest.raises(ValueError, match="this model has no chat template: name a built-in one"):
        LLM(str(tiny_llama_dir)).chat(CHAT)
    llm = LLM(str(tiny_llama_dir), chat_template="vicuna")
    messages = [{"role": "user", "content": "t5 t6"}]
    text = ("<s>A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions. "
            "USER: t5 t6 ASSISTANT:")  # with the tokenizer's own BOS
    assert llm.chat_template.render(messages) == text
    result = llm.chat(messages, SamplingParams(max_tokens=1))[0]
    assert result.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
