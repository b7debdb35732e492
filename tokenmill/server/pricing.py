"""Prices in USD per 1M tokens, by served model id (the catalog issue will own this table)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.models.default import DEFAULT_MODEL_ID


@dataclass(frozen=True)
class Price:
    input: float  # USD per 1M prompt tokens
    output: float  # USD per 1M completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input / 1e6 + completion_tokens * self.output / 1e6


PRICES: dict[str, Price] = {
    DEFAULT_MODEL_ID: Price(input=0.02, output=0.04),
}
FREE = Price(0.0, 0.0)  # a local model with no configured price


def price_for(model_id: str) -> Price:
    return PRICES.get(model_id, FREE)
