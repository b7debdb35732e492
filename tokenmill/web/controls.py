"""The playground's Model Configuration: one control per sampling parameter, named as the API
names it, with the API's default and valid range (SamplingParams and protocol.py hold the rules;
these are the values a browser can show and bound an input by)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Control:
    name: str  # the request body's field, and the control's label
    minimum: float
    maximum: float | None  # None: no upper bound
    step: float
    default: float  # the API's default: a request without the field behaves so
    help: str  # one line under the label


def controls(default_max_tokens: int, max_context: int) -> list[Control]:
    """The controls in the seed pages' order. max_tokens defaults to what the server fills in
    when a request has none (`default_max_tokens`, bounded by the largest served context)."""
    return [
        Control("max_tokens", 1, max_context, 1, min(default_max_tokens, max_context),
                "The most tokens to generate."),
        Control("temperature", 0, 2, 0.01, 1, "Randomness: 0 always takes the likeliest token."),
        Control("top_p", 0.01, 1, 0.01, 1, "Sample from the smallest set of tokens with this "
                "much probability."),
        Control("min_p", 0, 1, 0.01, 0, "Drop tokens less likely than this times the likeliest."),
        Control("top_k", -1, None, 1, -1, "Sample from the k likeliest tokens (-1 or 0: all)."),
        Control("presence_penalty", -2, 2, 0.01, 0, "Penalize tokens that appeared at all."),
        Control("frequency_penalty", -2, 2, 0.01, 0, "Penalize tokens by how often they "
                "appeared."),
        Control("repetition_penalty", 0.01, 2, 0.01, 1, "Divide the logits of tokens seen "
                "before by this (1: off)."),
    ]
