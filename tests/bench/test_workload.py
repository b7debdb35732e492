"""The bench's requests: exact prompt token counts by the model's tokenizer, one shared prefix,
lengths in their range, and the same requests for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.bench.workload import CHAT_PROMPTS, lengths, make_requests


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_random_prompts_have_exactly_their_token_count_and_repeat_for_a_seed(real_tokenizer):
    requests = make_requests("random", 6, tokenizer=real_tokenizer, input_len=64,
                             output_len=32, range_ratio=0.5, seed=3)
    assert [tokens(real_tokenizer, r.messages[0]["content"]) for r in requests] == [
        r.input_len for r in requests]
    assert all(32 <= r.input_len <= 96 and 16 <= r.output_len <= 48 for r in requests)
    again = make_requests("random", 6, tokenizer=real_tokenizer, input_len=64, output_len=32,
                          range_ratio=0.5, seed=3)
    assert again == requests
    assert make_requests("random", 6, tokenizer=real_tokenizer, input_len=64, output_len=32,
                         range_ratio=0.5, seed=4) != requests


def test_shared_prefix_requests_share_one_system_prompt_of_the_prefix_length(real_tokenizer):
    requests = make_requests("shared-prefix", 4, tokenizer=real_tokenizer, input_len=16,
                             output_len=8, prefix_len=300, seed=0)
    systems = {r.messages[0]["content"] for r in requests}
    assert len(systems) == 1 and tokens(real_tokenizer, systems.pop()) == 300
    assert len({r.messages[1]["content"] for r in requests}) == 4
    assert {r.input_len for r in requests} == {316}
    with pytest.raises(ValueError, match="prefix length"):
        make_requests("shared-prefix", 1, tokenizer=real_tokenizer, input_len=16,
                      output_len=8, prefix_len=0)


def test_every_kth_long_prompt_request_has_the_long_length(real_tokenizer):
    requests = make_requests("long-prompt", 8, tokenizer=real_tokenizer, input_len=16,
                             output_len=8, long_len=500, long_every=4, seed=0)
    assert [r.input_len for r in requests] == [16, 16, 16, 500] * 2
    assert [tokens(real_tokenizer, r.messages[0]["content"]) for r in requests] == \
        [16, 16, 16, 500] * 2
    with pytest.raises(ValueError, match="long length"):
        make_requests("long-prompt", 1, tokenizer=real_tokenizer, input_len=16,
                      output_len=8, long_len=0)


def test_chat_prompts_cycle_through_the_set(real_tokenizer):
    requests = make_requests("chat", len(CHAT_PROMPTS) + 1, tokenizer=real_tokenizer,
                             input_len=0, output_len=8)
    assert requests[-1].messages == requests[0].messages
    assert requests[0].input_len == tokens(real_tokenizer, CHAT_PROMPTS[0])


def test_lengths_stay_in_range_and_a_zero_ratio_is_fixed():
    rng = np.random.default_rng(0)
    assert lengths(rng, 5, 96, 0.0) == [96] * 5
    spread = lengths(rng, 1000, 10, 0.5)
    assert min(spread) == 5 and max(spread) == 15
    assert set(lengths(rng, 100, 1, 0.9)) == {1, 2}  # never below one token
