"""Text -> prompt token ids, the one place both front ends (the server, the offline LLM) use.

Chat messages are rendered with the model's chat template, which writes every special token
itself (BOS included), so they are encoded without adding any. A raw completion prompt is encoded
as the tokenizer would for the model (BOS added where the model expects it), as vLLM and
llama.cpp's server do.
"""

from __future__ import annotations

Messages = list[dict]


def render_chat(tokenizer, messages: Messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)
