"""Chat messages -> prompt text: the checkpoint's own Jinja chat template, or a built-in one.

Rendering follows transformers' `apply_chat_template` (utils/chat_template_utils.py) so that a
template renders here byte for byte as it does there, without transformers in the serving path:
an immutable sandbox with trim_blocks, lstrip_blocks and loop controls; the globals
`raise_exception`, `strftime_now`, `namespace` (no underscore attributes) and `dict`; a `tojson`
filter that keeps non-ASCII text and dict order; the `{% generation %}` block; and the variables
`messages` (message keys whose value is None dropped), `tools`, `documents` (None unless given),
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...), which
template kwargs override.

Templates are untrusted code run on request data: anything a render raises (the template's own
`raise_exception`, an undefined value, a sandbox violation, a type error on odd content) becomes a
`TemplateError`, the server's 400. A template that does not compile fails when it is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATES: tuple[str, ...] = ("llama3", "mistral", "chatml", "vicuna")
BUILTIN_DIR = Path(__file__).parent / "chat_templates"  # <name>.jinja for each built-in


class TemplateError(ValueError):
    """The chat template refused or failed on this request; the message says why (a 400)."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; templates expect json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes, the way out of the sandbox."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})")


class _Dict:
    """`dict(...)` without the dict type itself, whose attributes would open the sandbox."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's tokens
    for training masks: here it renders its body, as transformers does when not masking."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    return env


_ENV = _environment()  # configured once here, never changed: shared by every template


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not compile: {exc} (line {exc.lineno})") from None


class ChatTemplate:
    """One model's chat template: the Jinja source(s) and the special tokens it is rendered with.

    `sources` maps names to templates, as a tokenizer's dict of named templates does: a single
    template is "default"; with tools, "tool_use" is used when there is one (transformers' rule).
    """

    def __init__(self, name: str, sources: Mapping[str, str], special_tokens: Mapping[str, str]):
        if "default" not in sources:
            raise ValueError(f"chat template {name!r} has no 'default' among {sorted(sources)}")
        self.name = name  # "checkpoint" or the built-in's name
        self.sources = dict(sources)
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ... -> token text
        for source in self.sources.values():
            _compile(source)  # a template that does not compile fails now, not per request

    @classmethod
    def builtin(cls, name: str, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        """The built-in template `name` (one of BUILTIN_TEMPLATES), rendered with these tokens."""
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"unknown chat template {name!r}; the built-in ones are "
                             f"{', '.join(BUILTIN_TEMPLATES)}")
        source = (BUILTIN_DIR / f"{name}.jinja").read_text(encoding="utf-8")
        tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v}
        return cls(name, {"default": source}, tokens)

    @classmethod
    def for_tokenizer(cls, tokenizer, fallback: str | None = None) -> ChatTemplate | None:
        """The checkpoint's own template (`tokenizer.chat_template`, from tokenizer_config.json or
        GGUF `tokenizer.chat_template`), else the built-in `fallback`, else None."""
        own = getattr(tokenizer, "chat_template", None)
        if own:
            sources = own if isinstance(own, Mapping) else {"default": own}
            return cls("checkpoint", sources, getattr(tokenizer, "special_tokens_map", {}))
        if fallback:
            return cls.builtin(fallback, getattr(tokenizer, "bos_token", None),
                               getattr(tokenizer, "eos_token", None))
        return None

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages` (and `tools`, OpenAI function schemas); `extra` are
        template kwargs (e.g. `documents`, `date_string`), which win over the special tokens."""
        if not messages:
            raise TemplateError("the conversation is empty")
        name = "tool_use" if tools is not None and "tool_use" in self.sources else "default"
        template = _compile(self.sources[name])
        # transformers drops None-valued keys: templates test `'tool_calls' in message`
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"documents": None, **self.special_tokens, **extra}
        try:
            return template.render(messages=messages, tools=tools,
                                   add_generation_prompt=add_generation_prompt, **context)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:  # undefined values, sandbox violations
            raise TemplateError(f"the chat template failed: {exc}") from None
        except Exception as exc:  # the template's own code on content it did not expect
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
