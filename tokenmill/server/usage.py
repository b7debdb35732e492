"""Token counts and cost of one HTTP request, as its `usage` object reports them."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.catalog.pricing import Price, pico_to_usd
from tokenmill.engine.outputs import RequestOutput
from tokenmill.server.protocol import PromptTokensDetails, Usage


@dataclass
class UsageTally:
    """Counts over every engine request of one HTTP request (one per prompt of a list).

    Invariant: each entry holds the latest output's cumulative count, so feeding every output,
    in any interleaving of requests and choices, gives the final totals. A prompt's cached tokens
    are its first choice's: the other choices of an n > 1 request reuse the blocks that choice
    computed, which is no cache hit of the request's own."""

    prompt: dict[str, int] = field(default_factory=dict)  # engine request id -> prompt tokens
    cached: dict[str, int] = field(default_factory=dict)  # engine request id -> cached tokens
    output: dict[tuple[str, int], int] = field(default_factory=dict)  # (id, index) -> generated

    def add(self, out: RequestOutput) -> None:
        self.prompt[out.request_id] = out.num_prompt_tokens
        if out.index == 0:
            self.cached[out.request_id] = out.num_cached_tokens
        self.output[(out.request_id, out.index)] = out.num_output_tokens

    def counts(self) -> tuple[int, int, int]:
        """(prompt, cached prompt, completion) tokens so far."""
        return sum(self.prompt.values()), sum(self.cached.values()), sum(self.output.values())

    def cost_pico(self, price: Price) -> int:
        """The exact cost in picodollars (1e-12 USD)."""
        return price.cost_pico(*self.counts())

    def usage(self, price: Price) -> Usage:
        prompt, completion = sum(self.prompt.values()), sum(self.output.values())
        cached = PromptTokensDetails(cached_tokens=sum(self.cached.values()))
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion, prompt_tokens_details=cached,
                     estimated_cost=pico_to_usd(self.cost_pico(price)))
