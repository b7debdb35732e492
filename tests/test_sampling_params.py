"""SamplingParams: every range check names its parameter; edge values are accepted."""

from __future__ import annotations

import pytest

from tokenmill.engine.request import Request
from tokenmill.sampling_params import MAX_STOP, SamplingParams, SamplingParamsError


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 9), ("max_tokens", 0), ("min_tokens", -1), ("temperature", -0.1),
    ("temperature", 2.01), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.1),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", 2.5), ("logprobs", 21), ("logprobs", -1),
    ("stop", ("",)), ("stop", tuple("abcdefghijklmnopq")), ("logit_bias", {5: 101.0}),
    ("logit_bias", {-1: 1.0}), ("seed", 2**63), ("seed", -(2**63) - 1),
])
def test_out_of_range_values_name_their_parameter(field, value):
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(**{field: value})
    assert raised.value.param == field


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert raised.value.param == "min_tokens"


def test_normalises_containers():
    params = SamplingParams(stop="END", stop_token_ids=[3, 4], logit_bias={"7": 1})
    assert params.stop == ("END",)
    assert params.stop_token_ids == (3, 4)
    assert params.logit_bias == {7: 1.0}
    assert len(SamplingParams(stop=tuple("x" * i for i in range(1, MAX_STOP + 1))).stop) == 16


@pytest.mark.parametrize("seed", [-(2**63), 0, 2**63 - 1])
def test_seed_edges_make_a_generator_for_every_choice(seed):
    params = SamplingParams(seed=seed, n=8)
    for index in range(params.n):  # the engine seeds choice i with seed + i
        assert Request(f"r{index}", [1, 2], params, index=index).generator is not None


def test_greedy_and_top_k_flags():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(top_k=-1).top_k_enabled and SamplingParams(top_k=5).top_k_enabled
