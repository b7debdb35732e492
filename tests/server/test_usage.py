"""UsageTally: the usage object of one HTTP request from its engine outputs, in any order."""

from __future__ import annotations

from tokenmill.catalog.pricing import Price
from tokenmill.engine.outputs import RequestOutput
from tokenmill.server.usage import UsageTally


def out(rid: str, index: int, generated: int, prompt: int = 10, cached: int = 0) -> RequestOutput:
    return RequestOutput(request_id=rid, index=index, new_token_ids=[1], text="x", logprobs=[],
                         finish_reason=None, stop_reason=None, num_prompt_tokens=prompt,
                         num_cached_tokens=cached, num_output_tokens=generated)


def test_counts_are_cumulative_per_choice_and_prompts_once_per_request():
    tally = UsageTally()
    # Two prompts (engine requests a, b), n=2 each, outputs interleaved as the engine sends them.
    for o in [out("a", 0, 1, cached=8), out("a", 1, 1, cached=8), out("b", 0, 1, prompt=6),
              out("a", 0, 2, cached=8), out("b", 1, 3, prompt=6), out("a", 1, 4, cached=8),
              out("b", 0, 2, prompt=6)]:
        tally.add(o)
    usage = tally.usage(Price(input=2_000_000, output=10_000_000))  # USD 2 and 10 per 1M
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (16, 11, 27)
    assert usage.prompt_tokens_details.cached_tokens == 8
    # 16 * 2,000,000 + 11 * 10,000,000 picodollars
    assert tally.cost_pico(Price(2_000_000, 10_000_000)) == 142_000_000
    assert usage.estimated_cost == 0.000142


def test_cached_prompt_tokens_are_charged_at_the_cached_price():
    tally = UsageTally()
    tally.add(out("a", 0, 3, prompt=10, cached=8))
    price = Price(input=2_000_000, output=10_000_000, cached_input=500_000)
    # (10 - 8) * 2,000,000 + 8 * 500,000 + 3 * 10,000,000
    assert tally.cost_pico(price) == 4_000_000 + 4_000_000 + 30_000_000


def test_later_choices_sharing_the_first_choice_blocks_report_no_cache_hit():
    # n=2 over a cold prompt: choice 1 reuses the blocks choice 0 just computed.
    tally = UsageTally()
    for o in [out("a", 0, 1, cached=0), out("a", 1, 1, cached=8), out("a", 1, 2, cached=8)]:
        tally.add(o)
    assert tally.usage(Price(0, 0)).prompt_tokens_details.cached_tokens == 0


def test_no_outputs_is_zero_usage_at_zero_cost():
    usage = UsageTally().usage(Price(20_000, 40_000))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated_cost) == (0, 0, 0.0)
