"""LLMEngine through its own faults, on the tiny random Llama: a step that raises ends the user
requests it ran (every choice, finish_reason "error") and nothing else; the engine's invariants
hold after it, and every other request produces exactly the tokens of a run without the fault.
Also: choice ids no caller id can collide with, an all-or-nothing add_request, and independent
seeded choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tokenmill.engine import output_processor
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.request import Request, choice_seed
from tokenmill.sampling_params import SamplingParams


@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


def drive(engine: LLMEngine, results: dict | None = None) -> dict[tuple[str, int], Choice]:
    """Step until idle, checking the engine's integrity after every step; returns the choices
    by (request id, index), each with exactly one final output."""
    results = {} if results is None else results
    while engine.has_unfinished_requests():
        for out in engine.step():
            choice = results.setdefault((out.request_id, out.index), Choice())
            assert choice.finish is None, (out.request_id, out.index)
            choice.tokens += out.new_token_ids
            choice.finish = out.finish_reason
        engine.check_integrity()
    return results


def fail_runner(monkeypatch, engine: LLMEngine, group_id: str, on_call: int = 1,
                when=lambda sched_out: True) -> None:
    """Make the runner raise in the `on_call`-th step that runs a choice of `group_id` and
    satisfies `when(sched_out)`; every other step runs as usual."""
    execute, calls = engine.runner.execute, []

    def faulty(sched_out):
        if any(s.request.group_id == group_id for s in sched_out.scheduled) and when(sched_out):
            calls.append(sched_out)
            if len(calls) == on_call:
                raise RuntimeError("injected runner fault")
        return execute(sched_out)

    monkeypatch.setattr(engine.runner, "execute", faulty)


def assert_idle(engine: LLMEngine) -> None:
    engine.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_cache_usage == 0.0
    assert not engine.output_processor.has_group("v") and not engine.output_processor.has_group("w")


PROMPT = "Once upon a time there was a king who had three daughters"  # 12 tokens
OTHER = "The quick brown fox jumps over the lazy dog"  # 9 tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("on_call", [1, 2, 3])  # v's first prefill chunk, its second, a decode
def test_a_failed_step_ends_its_request_and_the_others_run_as_without_it(
        tiny_engine, monkeypatch, on_call):
    def scenario(engine: LLMEngine) -> dict:
        tok = engine.tokenizer
        prompt = tok.encode(PROMPT) * 2  # 24 tokens: two prefill chunks of a 16-token budget
        # One running request at a time: w waits behind both choices of v. w's prompt is v's,
        # so it hits the blocks v's steps cached; it asks for a penalty, which the runner keeps.
        engine.add_request("v", prompt, SamplingParams(temperature=0.0, max_tokens=6, n=2))
        engine.add_request("w", prompt, SamplingParams(temperature=0.0, max_tokens=6,
                                                       repetition_penalty=1.3))
        results = drive(engine)
        assert_idle(engine)
        engine.add_request("next", tok.encode(OTHER), GREEDY)
        return drive(engine, results)

    clean = scenario(tiny_engine(max_num_seqs=1))
    assert {k: c.finish for k, c in clean.items()} == {
        ("v", 0): "length", ("v", 1): "length", ("w", 0): "length", ("next", 0): "length"}
    engine = tiny_engine(max_num_seqs=1)
    fail_runner(monkeypatch, engine, "v", on_call)
    faulty = scenario(engine)
    emitted = max(on_call - 2, 0)  # the second chunk samples v's first token
    assert faulty[("v", 0)].tokens == clean[("v", 0)].tokens[:emitted]
    assert faulty[("v", 1)].tokens == []  # it was waiting for its sibling's prompt
    assert faulty[("v", 0)].finish == faulty[("v", 1)].finish == "error"
    assert faulty[("w", 0)] == clean[("w", 0)]
    assert faulty[("next", 0)] == clean[("next", 0)]
    assert_idle(engine)
    assert len(engine.runner.sampler.penalty_cache) == 0


def test_a_request_preempted_by_the_failed_step_resumes_as_without_the_fault(
        tiny_engine, monkeypatch):
    # 12 blocks of 4 tokens: c and p cannot both grow to the end, so p (the newer) is preempted.
    def scenario(engine: LLMEngine) -> dict:
        tok = engine.tokenizer
        engine.add_request("c", tok.encode(OTHER), SamplingParams(
            temperature=0.0, max_tokens=30, ignore_eos=True, presence_penalty=0.5))
        engine.add_request("p", tok.encode("Once upon a time there was a king"), SamplingParams(
            temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3))
        return drive(engine)

    def preempts_p(sched_out) -> bool:
        return [r.group_id for r in sched_out.preempted] == ["p"]

    clean = scenario(tiny_engine(num_blocks=12, max_model_len=48))
    engine = tiny_engine(num_blocks=12, max_model_len=48)
    fail_runner(monkeypatch, engine, "c", when=preempts_p)
    step, failed_at = engine.step, []

    def step_and_check():
        outputs = step()
        if any(out.finish_reason == "error" for out in outputs):  # the failed step: p's and
            failed_at.append(len(engine.runner.sampler.penalty_cache))  # c's penalty state gone
        return outputs

    engine.step = step_and_check
    faulty = scenario(engine)
    assert failed_at == [0]
    assert faulty[("c", 0)].finish == "error"
    assert faulty[("c", 0)].tokens == clean[("c", 0)].tokens[:len(faulty[("c", 0)].tokens)]
    assert 0 < len(faulty[("c", 0)].tokens) < 30
    assert faulty[("p", 0)] == clean[("p", 0)] and faulty[("p", 0)].finish == "length"
    engine.check_integrity()
    assert engine.stats().kv_cache_usage == 0.0


MARKER = 10000  # a token id only v's prompt holds: decoding it is what fails


def test_a_detokenizer_that_raises_ends_the_requests_of_its_step(tiny_engine, monkeypatch):
    def scenario(engine: LLMEngine) -> dict:
        tok = engine.tokenizer
        # Two running at a time, w waits. Step 1: c's prompt (9 tokens) and 7 of v's 13; step
        # 2: c's last token, then the rest of v's prompt, whose first token fails to decode.
        engine.add_request("c", tok.encode(OTHER), SamplingParams(temperature=0.0, max_tokens=2))
        engine.add_request("v", tok.encode(PROMPT) + [MARKER], GREEDY)
        engine.add_request("w", tok.encode(PROMPT), GREEDY)
        return drive(engine)

    clean = scenario(tiny_engine(max_num_seqs=2))
    assert all(MARKER not in c.tokens for c in clean.values())
    assert clean[("c", 0)].finish == "length"
    engine = tiny_engine(max_num_seqs=2)
    decode = engine.tokenizer.decode

    def faulty_decode(ids, **kwargs):
        if MARKER in ids:  # v's first output token is decoded with the prompt's tail
            raise ValueError("injected detokenizer fault")
        return decode(ids, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", faulty_decode)
    faulty = scenario(engine)
    assert faulty[("v", 0)] == Choice([], "error")  # its first token was never emitted
    # c shared v's step: its last token, decoded before v's, is lost with the step.
    assert faulty[("c", 0)] == Choice(clean[("c", 0)].tokens[:1], "error")
    assert faulty[("w", 0)] == clean[("w", 0)]
    engine.check_integrity()
    assert engine.stats().kv_cache_usage == 0.0


def test_caller_ids_never_collide_with_choices_of_other_requests(tiny_engine):
    engine = tiny_engine()
    tok = engine.tokenizer
    requests = {"x": 2, "x-1": 1, "x#1": 1, "x#0": 1, "x-0": 1}
    prompts = {rid: tok.encode(f"{OTHER} {i}") for i, rid in enumerate(requests)}
    for rid, n in requests.items():
        engine.add_request(rid, prompts[rid], SamplingParams(temperature=0.0, max_tokens=5, n=n))
    together = drive(engine)
    assert sorted(together) == [("x", 0), ("x", 1), ("x#0", 0), ("x#1", 0), ("x-0", 0),
                                ("x-1", 0)]
    for rid in requests:
        engine.add_request(rid, prompts[rid], SamplingParams(temperature=0.0, max_tokens=5))
        alone = drive(engine)[(rid, 0)]
        assert together[(rid, 0)] == alone == Choice(alone.tokens, "length"), rid
    assert together[("x", 1)] == together[("x", 0)]


def test_add_request_failing_in_the_scheduler_leaves_nothing_behind(tiny_engine, monkeypatch):
    engine = tiny_engine()
    ids = engine.tokenizer.encode(OTHER)
    add, added = engine.scheduler.add_request, []

    def fails_on_the_third(request: Request) -> None:
        added.append(request.request_id)
        if len(added) == 3:
            raise RuntimeError("injected scheduler fault")
        add(request)

    monkeypatch.setattr(engine.scheduler, "add_request", fails_on_the_third)
    params = SamplingParams(temperature=0.0, max_tokens=4, n=3)
    with pytest.raises(RuntimeError, match="injected scheduler fault"):
        engine.add_request("x", ids, params)
    assert len(added) == 3
    engine.check_integrity()
    assert not engine.has_unfinished_requests() and not engine.output_processor.has_group("x")
    monkeypatch.undo()
    engine.add_request("x", ids, params)  # the id is free again
    assert [c.finish for c in drive(engine).values()] == ["length"] * 3


def test_add_request_failing_in_the_output_processor_leaves_nothing_behind(
        tiny_engine, monkeypatch):
    engine = tiny_engine()
    ids = engine.tokenizer.encode(OTHER)
    detokenizer, made = output_processor.IncrementalDetokenizer, []

    def fails_on_the_second(*args, **kwargs):
        made.append(args)
        if len(made) == 2:
            raise MemoryError("injected detokenizer fault")
        return detokenizer(*args, **kwargs)

    monkeypatch.setattr(output_processor, "IncrementalDetokenizer", fails_on_the_second)
    with pytest.raises(MemoryError):
        engine.add_request("x", ids, SamplingParams(temperature=0.0, max_tokens=4, n=2))
    engine.check_integrity()
    assert not engine.has_unfinished_requests() and not engine.output_processor.has_group("x")
    monkeypatch.undo()
    engine.add_request("x", ids, SamplingParams(temperature=0.0, max_tokens=4, n=2))
    assert [c.finish for c in drive(engine).values()] == ["length"] * 2


def test_seeded_choices_draw_independent_reproducible_streams(tiny_engine):
    engine = tiny_engine()
    ids = engine.tokenizer.encode(PROMPT)

    def sample(seed: int, n: int) -> list[list[int]]:
        params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed, n=n)
        engine.add_request("s", ids, params)
        results = drive(engine)
        return [results[("s", i)].tokens for i in range(n)]

    first, second = sample(1234, 2)
    assert sample(1234, 2) == [first, second]  # same seed, same n: the same choices
    assert sample(1234, 1) == [first]  # choice 0 is the seed's own stream, whatever n is
    assert sample(1235, 1) != [second]  # choice 1 is not the next seed's choice 0
    assert first != second


def test_choice_seeds_are_distinct_across_seeds_and_choices():
    seeds = {choice_seed(seed, i) for seed in range(-100, 100) for i in range(8)}
    assert len(seeds) == 200 * 8
    assert [choice_seed(seed, 0) for seed in (-(2**63), -1, 0, 7, 2**63 - 1)] == \
        [-(2**63), -1, 0, 7, 2**63 - 1]
    assert all(0 <= choice_seed(seed, 5) < 2**64 for seed in (-(2**63), -1, 2**63 - 1))
    params = SamplingParams(seed=42, n=2)
    assert Request("a", [1], params).generator.initial_seed() == 42  # choice 0: the seed itself
