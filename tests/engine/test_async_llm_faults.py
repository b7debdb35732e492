"""AsyncLLM through faults, on the tiny random Llama: a failed step fails its streams alone,
repeated failures (or a failed recovery) declare the engine dead and fail every stream, a consumer
whose event loop closed is dropped, shutdown and death leave no stream waiting.

Timeouts here only guard against hangs; no assertion depends on how long anything takes.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from tokenmill.engine.async_llm import (AsyncLLM, EngineDeadError, FailureWindow,
                                        StepFailedError)
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
HANG_GUARD_S = 60


@pytest.fixture
def make_llm(tiny_llama, tiny_config):
    """make_llm(max_num_seqs=1, **AsyncLLM options) -> an AsyncLLM on the tiny Llama, shut down
    after the test."""
    made = []

    def make(max_num_seqs: int = 1, **options) -> AsyncLLM:
        config = tiny_config(max_num_seqs=max_num_seqs)
        made.append(AsyncLLM(lambda: LLMEngine(config, loaded=tiny_llama[1]), **options))
        return made[-1]

    yield make
    for llm in made:
        asyncio.run(llm.shutdown())


def ids(llm: AsyncLLM, text: str) -> list[int]:
    return llm.tokenizer.encode(text)


async def collect(llm: AsyncLLM, prompt: list[int], params: SamplingParams, request_id: str):
    """The tokens of each choice, or the exception the stream raised."""
    tokens: dict[int, list[int]] = {}
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            async for out in llm.generate(prompt, params, request_id):
                tokens.setdefault(out.index, []).extend(out.new_token_ids)
    except (StepFailedError, EngineDeadError) as exc:
        return exc
    return tokens


async def wait_idle(llm: AsyncLLM) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while llm.engine.has_unfinished_requests() or llm.stats().kv_cache_usage:
            await asyncio.sleep(0.01)


def fail_steps_of(llm: AsyncLLM, group_ids: set[str]) -> None:
    """Make the runner raise in every step that runs a choice of `group_ids`."""
    execute = llm.engine.runner.execute

    def faulty(sched_out):
        if any(s.request.group_id in group_ids for s in sched_out.scheduled):
            raise RuntimeError("injected runner fault")
        return execute(sched_out)

    llm.engine.runner.execute = faulty


async def test_a_failed_step_fails_its_stream_alone_and_the_engine_serves_on(make_llm):
    llm = make_llm()
    a, b = ids(llm, "Once upon a time"), ids(llm, "The quick brown fox")
    clean = await asyncio.gather(collect(llm, a, GREEDY, "a"), collect(llm, b, GREEDY, "b"))
    fail_steps_of(llm, {"victim"})
    # One running request at a time: a and b wait while the victim's step fails.
    victim, after_a, after_b = await asyncio.gather(
        collect(llm, a, SamplingParams(max_tokens=6, n=2), "victim"),
        collect(llm, a, GREEDY, "a"), collect(llm, b, GREEDY, "b"))
    assert type(victim) is StepFailedError
    assert str(victim) == "the engine failed while running this request"
    assert [after_a, after_b] == clean
    assert llm.is_healthy()
    assert await collect(llm, b, GREEDY, "next") == clean[1]
    await wait_idle(llm)
    llm.engine.check_integrity()


async def test_three_failed_steps_within_the_window_declare_the_engine_dead(make_llm):
    deaths = []
    llm = make_llm(max_step_failures=3, step_failure_window_s=3600, on_dead=deaths.append)
    fail_steps_of(llm, {"v1", "v2", "v3"})
    prompt = ids(llm, "Once upon a time")
    results = await asyncio.gather(*(collect(llm, prompt, GREEDY, rid)
                                     for rid in ("v1", "v2", "v3", "bystander")))
    assert [type(r) for r in results] == [StepFailedError] * 3 + [EngineDeadError]
    assert str(results[3]) == "the engine stopped: 3 steps failed within 3600 s"
    assert not llm.is_healthy()
    assert [str(d) for d in deaths] == ["3 steps failed within 3600 s"]
    with pytest.raises(EngineDeadError):  # at once: nothing is queued any more
        async for _ in llm.generate(prompt, GREEDY, "late"):
            pass


async def test_two_failed_steps_leave_the_engine_serving(make_llm):
    llm = make_llm(max_step_failures=3, step_failure_window_s=3600)
    fail_steps_of(llm, {"v1", "v2"})
    prompt = ids(llm, "Once upon a time")
    results = await asyncio.gather(*(collect(llm, prompt, GREEDY, rid)
                                     for rid in ("v1", "v2", "ok")))
    assert [type(r) for r in results] == [StepFailedError, StepFailedError, dict]
    assert llm.is_healthy()


def test_failures_count_only_within_the_window():
    window = FailureWindow(3, 60.0)
    assert [window.record(t) for t in (0.0, 10.0, 60.0, 69.0, 70.0)] == \
        [False, False, False, True, True]  # at 60 the failure at 0 is out; 10, 60, 69 are in
    assert [FailureWindow(1, 5.0).record(t) for t in (0.0,)] == [True]


async def test_a_failure_inside_the_recovery_declares_the_engine_dead(make_llm, monkeypatch):
    deaths = []
    llm = make_llm(on_dead=deaths.append)
    fail_steps_of(llm, {"victim"})

    def broken_reset():
        raise RuntimeError("injected recovery fault")

    monkeypatch.setattr(llm.engine.runner, "reset_request_state", broken_reset)
    prompt = ids(llm, "Once upon a time")
    victim, bystander = await asyncio.gather(collect(llm, prompt, GREEDY, "victim"),
                                             collect(llm, prompt, GREEDY, "bystander"))
    assert type(victim) is type(bystander) is EngineDeadError
    assert str(victim) == "the engine stopped: injected recovery fault"
    assert not llm.is_healthy() and [str(d) for d in deaths] == ["injected recovery fault"]


async def test_a_request_the_engine_fails_to_queue_fails_alone(make_llm, monkeypatch):
    llm = make_llm()
    add = llm.engine.add_request

    def faulty_add(request_id, prompt_token_ids, params):
        if request_id == "victim":
            raise RuntimeError("injected add fault")
        add(request_id, prompt_token_ids, params)

    monkeypatch.setattr(llm.engine, "add_request", faulty_add)
    prompt = ids(llm, "Once upon a time")
    victim, ok = await asyncio.gather(collect(llm, prompt, GREEDY, "victim"),
                                      collect(llm, prompt, GREEDY, "ok"))
    assert type(victim) is StepFailedError and list(ok) == [0] and len(ok[0]) == 6
    assert llm.is_healthy()


def test_a_consumer_whose_event_loop_closed_is_dropped_and_its_request_aborted(make_llm):
    llm = make_llm()
    prompt = ids(llm, "Once upon a time")
    # Hold the step thread in the orphan's second step until its consumer's loop is closed.
    execute, gate, calls = llm.engine.runner.execute, threading.Event(), []

    def gated(sched_out):
        calls.append(sched_out)
        if len(calls) == 2:
            gate.wait(HANG_GUARD_S)
        return execute(sched_out)

    llm.engine.runner.execute = gated
    loop = asyncio.new_event_loop()
    stream = llm.generate(prompt, LONG, "orphan")
    first = loop.run_until_complete(stream.__anext__())
    assert first.new_token_ids and not first.finished
    loop.close()
    gate.set()  # the second step's output finds the loop closed
    asyncio.run(wait_idle(llm))
    assert llm.is_healthy() and len(calls) == 2  # aborted after the step that found it gone
    llm.engine.runner.execute = execute
    assert list(asyncio.run(collect(llm, prompt, GREEDY, "orphan"))) == [0]  # its id is free
    asyncio.run(stream.aclose())  # the suspended generator, closed outside its dead loop


async def test_shutdown_fails_the_streams_in_flight(make_llm):
    llm = make_llm()
    prompt = ids(llm, "Once upon a time")
    execute, gate, calls = llm.engine.runner.execute, threading.Event(), []

    def gated(sched_out):  # the running request stays in flight until shutdown has begun
        calls.append(sched_out)
        if len(calls) == 2:
            gate.wait(HANG_GUARD_S)
        return execute(sched_out)

    llm.engine.runner.execute = gated
    first_output = asyncio.Event()

    async def consume(request_id):
        async for _ in llm.generate(prompt, LONG, request_id):
            first_output.set()

    running = asyncio.create_task(consume("running"))
    waiting = asyncio.create_task(consume("waiting"))
    await asyncio.wait_for(first_output.wait(), HANG_GUARD_S)
    shutdown = asyncio.create_task(llm.shutdown())
    for task in (running, waiting):
        with pytest.raises(EngineDeadError, match="^the engine was shut down$"):
            await asyncio.wait_for(task, HANG_GUARD_S)
    gate.set()
    await shutdown
    assert not llm.is_healthy()
    with pytest.raises(EngineDeadError, match="^the engine was shut down$"):
        async for _ in llm.generate(prompt, GREEDY, "after"):
            pass


async def test_a_stream_registered_while_the_engine_dies_fails_at_once(make_llm, monkeypatch):
    """The worst interleaving: the dying step thread starts failing the streams while `generate`
    is registering one, after it found the engine alive."""
    llm = make_llm()
    prompt = ids(llm, "Once upon a time")
    closing = threading.Event()  # set once the dying step thread goes for the streams' lock

    def broken_abort(request_id):  # a failure outside any step: the engine dies of it
        raise RuntimeError("injected abort fault")

    class SpyLock:
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if threading.current_thread() is llm._thread:
                closing.set()
            return self.lock.__enter__()

        def __exit__(self, *exc_info):
            return self.lock.__exit__(*exc_info)

    class Streams(dict):
        def __setitem__(self, request_id, stream):  # "late" was found alive, not yet added
            llm.abort("nobody")
            assert closing.wait(HANG_GUARD_S)
            super().__setitem__(request_id, stream)

    monkeypatch.setattr(llm.engine, "abort", broken_abort)
    llm._lock, llm._streams = SpyLock(llm._lock), Streams()
    late = await collect(llm, prompt, GREEDY, "late")
    assert type(late) is EngineDeadError
    assert str(late) == "the engine stopped: injected abort fault"
    assert not llm.is_healthy()
