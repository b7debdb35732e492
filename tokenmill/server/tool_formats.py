"""Tool calling per model family: how calls are written, the grammar that forces them, and the
prompt-side shape of tools, calls and results.

A `ToolFormat` is data: every family writes a call as `{"name": "<name>", "<key>": <arguments>}`
(key "arguments", or "parameters" for Llama 3), wrapped and separated by the family's own text:

  hermes   <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, calls joined by "\\n"
           (Qwen2/2.5, OpenHermes: the chatml models)
  llama3   {"name": ..., "parameters": {...}}, calls joined by "; " (Llama 3.1+ JSON calling)
  mistral  [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] (Mistral v0.3; [TOOL_CALLS] is
           the tokenizer's control token when it has one)
  generic  {"tool_calls": [{"name": ..., "arguments": {...}}, ...]}, the whole reply (models
           with no native format: the server describes it in a system message)

Invariant: under `grammar`, a call's arguments are the compact JSON text the model wrote, and
the parser (tool_stream.py) hands back exactly that text as `function.arguments`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass

CALL_ID_ALPHABET = string.ascii_letters + string.digits
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# Compact JSON inside %json (as engine/structured.py's JSON mode): no wandering whitespace.
_COMPACT = {"whitespace_flexible": False}


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class Marker:
    """Text that opens the calls. `at_start`: only at the start of the reply (after leading
    whitespace); else anywhere, the text before it being the reply's content."""

    text: str
    at_start: bool


@dataclass(frozen=True)
class ToolFormat:
    name: str
    markers: tuple[Marker, ...]  # what begins the calls region, for the parser
    args_key: str  # "arguments" or "parameters"
    opening: str  # written once before the calls (after the marker token, for mistral)
    call_prefix: str  # before each call's JSON object
    call_suffix: str  # after it
    separator: str  # between two calls
    closing: str  # after the last call
    free_text: str  # Lark regex of a reply that is not a call (tool_choice "auto")
    special_marker: str | None = None  # a control token written before `opening`, if the
    # tokenizer has it

    def call_head(self, name: str) -> str:
        return f'{self.call_prefix}{{"name": "{name}", "{self.args_key}": '

    def call_text(self, name: str, arguments: str) -> str:
        """One call as the model writes it (arguments: JSON text)."""
        return f"{self.call_head(name)}{arguments}}}{self.call_suffix}"

    def calls_text(self, calls: list[tuple[str, str]]) -> str:
        """A whole reply of calls ((name, arguments JSON text) each), marker included."""
        body = self.separator.join(self.call_text(n, a) for n, a in calls)
        return f"{self.special_marker or ''}{self.opening}{body}{self.closing}"

    def grammar(self, functions: list[dict], parallel: bool, allow_text: bool,
                tokenizer=None) -> str:
        """A Lark grammar (llguidance's dialect) forcing one call of one of `functions` (OpenAI
        function objects), or one or more with `parallel`; with `allow_text`, a reply that is
        plain text (never a marker) is allowed too.

        `auto` (allow_text) is "text | calls" rather than "text then calls": llguidance's lexer
        is greedy, so text followed by a marker would swallow the marker's first bytes. The
        parser still takes content before the calls (what unconstrained models write)."""
        lines = []
        start = "calls"
        if allow_text:
            start = "TEXT | calls"
            lines.append(f"TEXT: {self.free_text}")
        lines.insert(0, f"start: {start}")
        repeat = f"({_literal(self.separator)} call)*" if parallel else ""
        parts = [self._marker_rule(tokenizer), _literal(self.opening), "call", repeat,
                 _literal(self.closing)]
        lines.append("calls: " + " ".join(p for p in parts if p))
        lines.append("call: " + " | ".join(f"fn_{i}" for i in range(len(functions))))
        for i, fn in enumerate(functions):
            head = json.dumps(self.call_head(fn["name"]))
            tail = _literal("}" + self.call_suffix)
            lines.append(f"fn_{i}: {head} args_{i} {tail}")
            schema = {**(fn.get("parameters") or NO_PARAMETERS), "x-guidance": _COMPACT}
            lines.append(f"args_{i}: %json {json.dumps(schema)}")
        return "\n".join(lines) + "\n"

    def _marker_rule(self, tokenizer) -> str:
        if self.special_marker is None:
            return ""
        token_id = _special_id(tokenizer, self.special_marker)
        if token_id is None:  # no such control token: the model writes it as text
            return _literal(self.special_marker)
        return f"<[{token_id}]>"


def _literal(text: str) -> str:
    """A Lark string literal (a JSON string is one), or nothing for empty text."""
    return json.dumps(text, ensure_ascii=False) if text else ""


def _special_id(tokenizer, token: str) -> int | None:
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return vocab.get(token)


HERMES = ToolFormat(
    name="hermes", markers=(Marker("<tool_call>", at_start=False),), args_key="arguments",
    opening="", call_prefix="<tool_call>\n", call_suffix="\n</tool_call>", separator="\n",
    closing="", free_text=r"/(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/")
LLAMA3 = ToolFormat(
    name="llama3", markers=(Marker('{"name"', at_start=True),), args_key="parameters",
    opening="", call_prefix="", call_suffix="", separator="; ", closing="",
    free_text=r"/[^{\s](.|\n)*/")
MISTRAL = ToolFormat(
    name="mistral",
    markers=(Marker("[TOOL_CALLS]", at_start=False), Marker('[{"name"', at_start=True)),
    args_key="arguments", opening=" [", call_prefix="", call_suffix="", separator=", ",
    closing="]", free_text=r"/[^\[\s](.|\n)*/", special_marker="[TOOL_CALLS]")
GENERIC = ToolFormat(
    name="generic", markers=(Marker('{"tool_calls"', at_start=True),), args_key="arguments",
    opening='{"tool_calls": [', call_prefix="", call_suffix="", separator=", ", closing="]}",
    free_text=r"/[^{\s](.|\n)*/")

# By the catalog's `tool_format` names (catalog.TOOL_FORMATS, which cannot import this layer).
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, GENERIC)}


# ---- the prompt side ---------------------------------------------------------------------------


def instructions(fmt: ToolFormat, tools: list[dict]) -> str:
    """A system message describing `tools` and how to call them in `fmt`, for templates that
    cannot render tools themselves (and always for the generic format)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = fmt.calls_text([("<function-name>", "<arguments-json-object>")])
    return ("You can call the following functions:\n" + listing + "\n\nTo call one or more "
            "of them, reply with only this, and nothing else:\n" + example + "\n\nOtherwise, "
            "answer normally.")


def mistral_call_id(call_id: str) -> str:
    """Mistral's templates need 9-character alphanumeric ids: OpenAI's, mapped stably."""
    digest = int.from_bytes(hashlib.sha256(call_id.encode("utf-8")).digest(), "big")
    return "".join(CALL_ID_ALPHABET[(digest >> (6 * i)) % 62] for i in range(9))


def arguments_object(arguments: str):
    """A call's arguments as templates want them (a dict); text that is not JSON stays text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
