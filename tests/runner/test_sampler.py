"""Sampler on hand-made logits: every SamplingParams field, exact values."""

import math

import pytest
import torch

from sampling_cases import EOS, req, rows
from tokenmill.runner.sampler import Sampler, filter_logits, process_logits

INF = float("inf")


# --- greedy and temperature -------------------------------------------------------------------


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = rows([0.0, 3.0, 1.0, 3.0], [9.0, -1.0, 0.0, 0.0], [-2.0, -1.0, -1.0, -3.0])
    out = Sampler(4, (EOS,))(logits, [req(temperature=0.0) for _ in range(3)])
    assert out.token_ids == [1, 0, 1]
    assert out.logprobs == [None, None, None]


def test_padded_vocab_columns_are_never_sampled():
    logits = rows([0.0, 1.0, 2.0, 50.0, 50.0])  # columns 3, 4: padding past vocab_size 3
    sampler = Sampler(3, (EOS,))
    assert sampler(logits, [req(temperature=0.0)]).token_ids == [2]
    assert sampler(logits, [req(temperature=1.0, seed=1)]).token_ids[0] < 3


def test_temperature_divides_logits_before_the_race():
    logits = rows([1.0, 2.0, 0.5, -1.0, 0.0, 1.5])
    for seed in range(20):
        token = Sampler(6, (EOS,))(logits, [req(temperature=0.7, seed=seed)]).token_ids[0]
        q = torch.empty(6).exponential_(generator=torch.Generator().manual_seed(seed))
        assert token == int(((logits[0] / 0.7).softmax(-1) / q).argmax())


def test_low_temperature_concentrates_and_high_temperature_spreads():
    logits = rows([0.0, 1.0])
    cold = [req(temperature=0.05, seed=s) for s in range(300)]  # p(token 0) = e^-20
    assert set(Sampler(2, (EOS,))(logits.expand(300, 2), cold).token_ids) == {1}
    hot = [req(temperature=2.0, seed=s) for s in range(2000)]
    share = Sampler(2, (EOS,))(logits.expand(2000, 2), hot).token_ids.count(0) / 2000
    assert abs(share - 1 / (1 + math.exp(0.5))) < 0.03  # 0.378


# --- top_k, top_p, min_p ----------------------------------------------------------------------


def kept(logits, top_k=None, top_p=None, min_p=None) -> list[list[int]]:
    def t(values, dtype):
        return None if values is None else torch.tensor(values, dtype=dtype)

    f32 = torch.float32
    out = filter_logits(logits, t(top_k, torch.long), t(top_p, f32), t(min_p, f32))
    return [torch.nonzero(row > -INF).flatten().tolist() for row in out]


def test_top_k_keeps_the_k_largest_and_boundary_ties():
    logits = rows(*[[1.0, 4.0, 3.0, 2.0, 4.0]] * 4)
    assert kept(logits, top_k=[1, 2, 3, 0]) == [[1, 4], [1, 4], [1, 2, 4], [0, 1, 2, 3, 4]]
    # Kept logits are untouched.
    assert filter_logits(logits[:1], torch.tensor([3]), None, None).tolist() == [
        [-INF, 4.0, 3.0, -INF, 4.0]
    ]


def test_top_k_never_samples_outside_the_top_k():
    logits = rows([0.1, 0.0, 0.3, 0.2, 0.05, 0.25]).expand(500, 6)
    out = Sampler(6, (EOS,))(logits, [req(top_k=2, seed=s) for s in range(500)])
    assert set(out.token_ids) == {2, 5}


def test_a_top_k_past_the_vocabulary_or_int64_keeps_every_token():
    """Found by fuzzing the server: top_k 366908281674543005696 failed the step."""
    logits = rows([0.1, 0.0, 0.3]).expand(300, 3)
    for top_k in (3, 4, 2**70):
        out = Sampler(3, (EOS,))(logits, [req(top_k=top_k, seed=s) for s in range(300)])
        assert set(out.token_ids) == {0, 1, 2}


DYADIC = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))  # softmax is exactly these


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (1.0, [0, 1, 2, 3]),
        (0.1, [1]),  # always at least the most likely token
        (0.5, [1]),  # 0.5 reached exactly by the first token
        (0.5001, [1, 3]),
        (0.75, [1, 3]),  # reached exactly by two tokens
        (0.7501, [0, 1, 3]),  # equal probabilities: the lower id comes first
        (0.875, [0, 1, 3]),
        (0.9, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(DYADIC, top_p=[top_p]) == [expected]


def test_top_p_applies_after_top_k():
    # top_k=2 leaves {1: 2/3, 3: 1/3}; top_p=0.6 then keeps token 1 alone.
    assert kept(DYADIC, top_k=[2], top_p=[0.6]) == [[1]]
    assert kept(DYADIC, top_k=[2], top_p=[0.7]) == [[1, 3]]


@pytest.mark.parametrize(
    "min_p, expected",
    [(0.0, [0, 1, 2, 3]), (0.25, [0, 1, 2, 3]), (0.26, [1, 3]), (0.5, [1, 3]), (1.0, [1])],
)
def test_min_p_drops_tokens_below_min_p_times_max(min_p, expected):
    assert kept(DYADIC, min_p=[min_p]) == [expected]


def test_filters_are_per_row():
    logits = torch.cat([DYADIC, DYADIC, DYADIC])
    assert kept(logits, top_k=[1, 0, 0], top_p=[1.0, 0.6, 1.0], min_p=[0.0, 0.0, 0.3]) == [
        [1],
        [1, 3],
        [1, 3],
    ]


def test_sampling_respects_top_p_and_min_p():
    logits = DYADIC.expand(400, 4)
    out = Sampler(4, (EOS,))(logits, [req(top_p=0.75, seed=s) for s in range(400)])
    assert set(out.token_ids) == {1, 3}
    out = Sampler(4, (EOS,))(logits, [req(min_p=0.3, seed=s) for s in range(400)])
    assert set(out.token_ids) == {1, 3}


# --- logit processing: bias, min_tokens, penalties -------------------------------------------


def test_logit_bias_is_added():
    logits = rows([1.0, 2.0, 3.0, 4.0])
    out = process_logits(logits, [req(logit_bias={1: 5.0, 3: -100.0, 99: 1.0})], (EOS,))
    assert out.tolist() == [[1.0, 7.0, 3.0, -96.0]]
    assert logits.tolist() == [[1.0, 2.0, 3.0, 4.0]]  # input untouched


def test_logit_bias_forces_a_token():
    logits = rows([5.0, 0.0, 0.0])
    out = Sampler(3, (EOS,))(logits, [req(temperature=0.0, logit_bias={2: 100.0})])
    assert out.token_ids == [2]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = rows(*[[1.0, 2.0, 3.0, 4.0, 5.0]] * 4)
    requests = [
        req(output=[4], min_tokens=2, stop_token_ids=(3,)),  # 1 < 2: masked
        req(output=[4], min_tokens=2, stop_token_ids=(3,), ignore_eos=True),  # EOS masked anyway
        req(output=[4, 4], min_tokens=2, stop_token_ids=(3,)),  # reached: nothing masked
        req(output=[], min_tokens=0, stop_token_ids=(3,)),
    ]
    assert process_logits(logits, requests, (EOS, 2)).tolist() == [
        [-INF, 2.0, -INF, -INF, 5.0],
        [-INF, 2.0, -INF, -INF, 5.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
        [1.0, 2.0, 3.0, 4.0, 5.0],
    ]


def test_min_tokens_stops_greedy_from_ending():
    logits = rows([9.0, 1.0, 2.0])
    out = Sampler(3, (EOS,))(logits, [req(temperature=0.0, min_tokens=1)])
    assert out.token_ids == [2]


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_processed_logits_before_temperature():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 32, generator=gen)
    requests = [
        req(temperature=0.0, logprobs=0),
        req(temperature=0.5, top_k=3, seed=7, logprobs=20, logit_bias={4: 2.0}),
        req(temperature=0.0),
    ]
    out = Sampler(32, (EOS,))(logits, requests)
    expected = process_logits(logits, requests, (EOS,)).log_softmax(-1)

    first, second, third = out.logprobs
    assert third is None
    assert first.token_id == out.token_ids[0] == int(logits[0].argmax())
    assert first.logprob == expected[0, first.token_id].item()
    assert first.top == []

    assert second.token_id == out.token_ids[1]
    assert second.logprob == expected[1, second.token_id].item()
    order = expected[1].argsort(descending=True)[:20].tolist()
    assert [t for t, _ in second.top] == order
    assert [lp for _, lp in second.top] == expected[1, order].tolist()
    assert all(a >= b for (_, a), (_, b) in zip(second.top, second.top[1:]))


def test_logprobs_of_a_masked_token_is_minus_inf():
    logits = rows([5.0, 0.0, 0.0])
    out = Sampler(3, (EOS,))(logits, [req(temperature=0.0, min_tokens=1, logprobs=3)])
    assert out.logprobs[0].top[-1] == (EOS, -INF)


# --- per-request seeds ------------------------------------------------------------------------

TARGET = dict(temperature=0.8, top_k=20, top_p=0.95, presence_penalty=0.3, seed=1234)
OTHERS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=1.0, seed=99),
    dict(temperature=0.5, top_p=0.5, seed=5),
    dict(temperature=1.3, min_p=0.1, repetition_penalty=1.5),
    dict(temperature=0.0, frequency_penalty=1.0, logprobs=5),
    dict(temperature=0.9, top_k=3, seed=1234),
]


def run_target(params: dict, batched: bool, steps: int = 50) -> list[int]:
    """Draw `steps` tokens for one request, alone or moving through a batch of 8."""
    vocab = 64
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(42)) * 3
    target = req(rid="target", **params)
    others = [req(rid=f"o{i}", **p) for i, p in enumerate(OTHERS)]
    sampler = Sampler(vocab, (EOS,))
    for step in range(steps):
        if batched:
            pos = step % 8
            batch = others[:pos] + [target] + others[pos:]
            noise = torch.randn(8, vocab)  # the other rows see different logits
            logits = torch.cat([noise[:pos], step_logits[step : step + 1], noise[pos + 1 :]])
        else:
            pos, batch, logits = 0, [target], step_logits[step : step + 1]
        token_ids = sampler(logits, batch).token_ids
        for r, t in zip(batch, token_ids):
            r.output_token_ids.append(t)
    return target.output_token_ids


def test_same_seed_same_tokens_alone_or_in_any_batch_position():
    alone = run_target(TARGET, batched=False)
    assert run_target(TARGET, batched=True) == alone
    assert len(set(alone)) > 5  # it really samples


def test_different_seeds_differ():
    assert run_target(TARGET, batched=False) != run_target({**TARGET, "seed": 4321}, batched=False)


def sorted_top_k_top_p(logits, top_k, top_p):
    """Reference: the definition by one stable full sort per row."""
    out = logits.clone()
    for row, k, p in zip(out, top_k.tolist(), top_p.tolist()):
        values, order = row.sort(descending=True, stable=True)
        if k > 0:
            values = values.masked_fill(values < values[k - 1], -INF)
        mass_before = torch.nn.functional.pad(values.softmax(-1).cumsum(-1)[:-1], (1, 0))
        drop = (values == -INF) | ((mass_before >= p) & (p < 1.0))
        row[order[drop]] = -INF
    return out


def test_top_k_top_p_match_a_full_sort_on_a_large_vocab_with_ties():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5000, generator=gen) * torch.tensor([[0.3], [1], [3], [8]] * 2)
    logits[:, 2500:] = logits[:, :2500]  # every logit twice: ties everywhere, even at the cut
    logits[:, 100:200] = -INF
    top_k = torch.tensor([0, 0, 0, 0, 40, 1, 700, 0])
    top_p = torch.tensor([0.9, 0.99, 0.5, 1.0, 0.9, 0.3, 0.95, 0.999])
    expected = sorted_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(filter_logits(logits, top_k, top_p, None), expected)


# --- parameters at the edge of float32 -------------------------------------------------------


def test_float32_underflowing_parameters_sample_the_limit_and_never_nan():
    """Values the API accepts but float32 cannot hold (found by fuzzing the server: top_p 5e-324
    once killed the step loop) give the limiting distribution, in one batch with normal rows."""
    logits = rows([0.5, 3.0, 1.0, -2.0, 2.5, 0.0])
    requests = [
        req(temperature=1.0, top_p=5e-324, seed=1),  # 0 in float32: keeps only the top token
        req(temperature=1e-300, seed=2),  # below GREEDY_BELOW_TEMPERATURE: greedy
        req(temperature=9e-6),  # likewise
        # seen token 2 (logit 1.0) divided by ~0: infinitely likely, even after temperature
        req(prompt=[2], temperature=0.5, repetition_penalty=5e-324, seed=3, logprobs=2),
        req(temperature=1.0, seed=4),  # an ordinary row beside them
    ]
    out = Sampler(6, (EOS,))(logits.expand(len(requests), -1).clone(), requests)
    assert out.token_ids[:4] == [1, 1, 1, 2]
    assert 0 <= out.token_ids[4] < 6
    lp = out.logprobs[3]
    assert lp.token_id == 2 and lp.logprob == 0.0 and lp.top[0] == (2, 0.0)
    assert all(math.isfinite(v) or v == -math.inf for _, v in lp.top)
