"""Penalties: repetition (transformers' rule), presence and frequency (OpenAI's), exact values,
and the per-request state that carries them from step to step."""

import gc
from collections import Counter

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from sampling_cases import EOS, req, rows
from tokenmill.runner.penalties import PenaltyCache, apply_penalties
from tokenmill.runner.sampler import Sampler, process_logits



def test_no_penalty_returns_the_logits_untouched():
    logits = rows([1.0, 2.0])
    assert apply_penalties(logits, [req()], PenaltyCache()) is logits


def test_repetition_penalty_over_prompt_and_output():
    logits = rows([2.0, -2.0, 1.0, -1.0, 0.5, 0.0])
    r = req(prompt=[0, 5], output=[1, 1], repetition_penalty=2.0)
    assert process_logits(logits, [r], (EOS,)).tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5, 0.0]]


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    token_ids = torch.randint(0, 50, (3, 12), generator=gen)
    for penalty in (0.5, 1.3, 2.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(token_ids, logits.clone())
        requests = [
            req(prompt=ids[:7], output=ids[7:], repetition_penalty=penalty)
            for ids in token_ids.tolist()
        ]
        assert torch.equal(apply_penalties(logits, requests, PenaltyCache()), expected)


def test_presence_and_frequency_penalties_over_output_only():
    logits = rows([1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    requests = [
        req(prompt=[0, 1], output=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25),
        req(prompt=[0, 1], output=[2, 2, 3], presence_penalty=-1.0, frequency_penalty=-0.5),
    ]
    assert process_logits(logits, requests, (EOS,)).tolist() == [
        [1.0, 1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0],
        [1.0, 1.0, 1.0 + 1.0 + 1.0, 1.0 + 1.0 + 0.5, 1.0],
    ]


def test_processing_order_and_row_isolation():
    logits = rows([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    # bias (1 -> 2), then repetition (2 / 2 = 1), then presence+frequency (1 - 0.5 - 0.5 = 0).
    r = req(prompt=[1], output=[1], logit_bias={1: 1.0}, repetition_penalty=2.0,
            presence_penalty=0.5, frequency_penalty=0.5)
    assert process_logits(logits, [r, req()], (EOS,)).tolist() == [
        [1.0, 0.0, 1.0, 1.0],
        [1.0, 1.0, 1.0, 1.0],
    ]


def reference_penalties(logits, requests):
    """Repetition over the distinct prompt and output ids, then presence/frequency over the
    output counts, one entry at a time in Python (ids >= V ignored)."""
    out = logits.clone()
    vocab = logits.shape[1]
    for row, r in zip(out, requests):
        p = r.sampling_params
        for t in {t for t in r.prompt_token_ids + r.output_token_ids if t < vocab}:
            x = row[t : t + 1]
            row[t] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        for t, n in Counter(t for t in r.output_token_ids if t < vocab).items():
            x, n = row[t : t + 1], torch.tensor([float(n)])
            row[t] = x - torch.tensor([p.frequency_penalty]) * n - p.presence_penalty
    return out


def test_penalty_state_kept_across_steps_equals_a_fresh_computation():
    vocab = 48
    gen = torch.Generator().manual_seed(0)
    requests = [
        req(prompt=[1, 2, 2, 47], rid="rep", repetition_penalty=1.7),
        req(prompt=[3, 99], output=[4, 4, 5], rid="pf", presence_penalty=0.4,
            frequency_penalty=-0.3),  # 99 >= V: ignored
        req(prompt=[6] * 30, rid="all", repetition_penalty=0.8, presence_penalty=-1.0,
            frequency_penalty=0.25),
        req(prompt=[7], rid="none"),
    ]
    cache = PenaltyCache()
    for step in range(60):
        # A changing batch: a request may sit out steps (preempted: it keeps its output) and come
        # back with 0, 1 or 3 new tokens, as after a chunked or speculative step.
        batch = [r for i, r in enumerate(requests) if (step + i) % 5 != 0]
        logits = torch.randn(len(batch), vocab, generator=gen) * 3
        got = process_logits(logits, batch, (EOS,), cache)
        assert torch.equal(got, process_logits(logits, batch, (EOS,)))  # fresh state
        assert torch.equal(got, reference_penalties(logits, batch))
        for r in batch:
            new = torch.randint(0, vocab + 4, ((0, 1, 3)[step % 3],), generator=gen)
            r.output_token_ids.extend(new.tolist())  # ids >= V are ignored too
    assert len(set(requests[2].output_token_ids)) > 16  # the counts' buffers had to grow


def test_penalty_state_goes_with_its_request():
    sampler = Sampler(8, (EOS,))
    r = req(prompt=[1, 2], output=[3], repetition_penalty=1.5, frequency_penalty=0.5)
    sampler(rows([1.0] * 8), [r, req()])
    assert len(sampler.penalty_cache) == 1  # only the row that asks for a penalty
    del r
    gc.collect()
    assert len(sampler.penalty_cache) == 0
