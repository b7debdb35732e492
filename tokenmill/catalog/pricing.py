"""Exact money for the catalog: prices are integers of micro-USD per 1M tokens, costs integers of
picodollars (1e-12 USD), so one token at a price of p micro-USD per 1M costs exactly p picodollars
and no sum of costs ever rounds. Floats appear only at the edge, in what the API shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MICRO = 10**6  # micro-USD per USD
PICO = 10**12  # picodollars per USD


@dataclass(frozen=True)
class Price:
    input: int  # micro-USD per 1M prompt tokens
    output: int  # micro-USD per 1M completion tokens
    cached_input: int | None = None  # micro-USD per 1M cached prompt tokens; None: the input price

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is None and name == "cached_input":
                continue
            if type(value) is not int or value < 0:
                raise ValueError(f"price {name} must be a non-negative integer of micro-USD per "
                                 f"1M tokens, not {value!r}")

    def cost_pico(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """Picodollars for a request; `cached_tokens` are the prompt tokens served from the cache
        (a subset of `prompt_tokens`), charged at the cached price."""
        if not 0 <= cached_tokens <= prompt_tokens or completion_tokens < 0:
            raise ValueError(f"bad token counts: prompt {prompt_tokens}, cached {cached_tokens}, "
                             f"completion {completion_tokens}")
        cached_price = self.input if self.cached_input is None else self.cached_input
        return ((prompt_tokens - cached_tokens) * self.input + cached_tokens * cached_price
                + completion_tokens * self.output)

    def per_million_usd(self) -> dict:
        """USD per 1M tokens, as /v1/models shows them; `cached_input` only when priced apart."""
        usd = {"input": self.input / MICRO, "output": self.output / MICRO}
        if self.cached_input is not None:
            usd["cached_input"] = self.cached_input / MICRO
        return usd

    @classmethod
    def from_usd(cls, input, output, cached_input=None) -> Price:
        """From USD per 1M tokens given as "0.39" or 0.39 (read through Decimal: exactly the digits
        written); more precise than one micro-USD is an error, never a rounding."""
        return cls(_micro(input, "input"), _micro(output, "output"),
                   None if cached_input is None else _micro(cached_input, "cached_input"))


FREE = Price(0, 0)  # a local model with no price in the catalog


def pico_to_usd(pico: int) -> float:
    """Picodollars as USD (the nearest float: int / int division rounds once)."""
    return pico / PICO


def _micro(usd, name: str) -> int:
    if isinstance(usd, bool) or not isinstance(usd, (str, int, float, Decimal)):
        raise ValueError(f"price {name} must be a number of USD per 1M tokens, not {usd!r}")
    try:
        # str() of a float is its shortest round-trip repr: 0.39 reads as Decimal("0.39").
        value = Decimal(usd if isinstance(usd, (str, Decimal)) else str(usd)) * MICRO
    except InvalidOperation:
        raise ValueError(f"price {name} {usd!r} is not a number") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ValueError(f"price {name} {usd!r} must be a non-negative number of USD per 1M "
                         "tokens with at most 6 decimals")
    return int(value)
