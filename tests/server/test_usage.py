"""UsageTally: the usage object of one HTTP request from its engine outputs, in any order."""

from __future__ import annotations

from tokenmill.engine.outputs import RequestOutput
from tokenmill.server.pricing import Price
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
    usage = tally.usage(Price(input=2.0, output=10.0))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (16, 11, 27)
    assert usage.prompt_tokens_details.cached_tokens == 8
    # 16 * 2 / 1e6 + 11 * 10 / 1e6
    assert usage.estimated_cost == 0.000142


def test_no_outputs_is_zero_usage_at_zero_cost():
    usage = UsageTally().usage(Price(0.02, 0.04))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated_cost) == (0, 0, 0.0)
