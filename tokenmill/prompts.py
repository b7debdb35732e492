"""Text -> prompt token ids, the one place both front ends (the server, the offline LLM) use.

Chat messages are rendered with the model's chat template (tokenmill/catalog/templates.py), which
writes every special token itself (BOS included), so they are encoded without adding any. A raw
completion prompt is encoded as the tokenizer would for the model (BOS added where the model
expects it), as vLLM and llama.cpp's server do.
"""

from __future__ import annotations

from tokenmill.catalog.templates import ChatTemplate

Messages = list[dict]


def render_chat(template: ChatTemplate, tokenizer, messages: Messages,
                tools: list[dict] | None = None) -> list[int]:
    """Raises TemplateError when the template refuses the conversation."""
    text = template.render(messages, tools=tools, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)
