"""AsyncLLM: streams from the step thread, abort on early exit, a responsive event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.llm_engine import LLMEngine, PromptError
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(loaded_default_model, default_model_path):
    config = EngineConfig(model=str(default_model_path), dtype="float32", device="cpu",
                          max_model_len=1024, kv_cache_gib=0.1)
    front = AsyncLLM(lambda: LLMEngine(config, loaded=loaded_default_model))
    yield front
    asyncio.run(front.shutdown())
    assert not front.is_healthy()


def prompt(llm: AsyncLLM, text: str) -> list[int]:
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
    return llm.tokenizer.encode(rendered, add_special_tokens=False)


async def collect(llm, ids, params, request_id):
    texts, tokens, finish = {}, {}, {}
    async for out in llm.generate(ids, params, request_id):
        texts[out.index] = texts.get(out.index, "") + out.text
        tokens[out.index] = tokens.get(out.index, []) + out.new_token_ids
        if out.finished:
            finish[out.index] = out.finish_reason
    return texts, tokens, finish


async def wait_idle(llm):
    for _ in range(200):
        stats = llm.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {llm.stats()}")


async def test_streams_equal_offline_greedy(llm):
    ids = prompt(llm, "What is the capital of France?")
    params = SamplingParams(temperature=0.0, max_tokens=12)
    texts, tokens, finish = await collect(llm, ids, params, "s1")
    offline = llm.engine.tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert texts[0] == offline and finish[0] in ("stop", "length")


async def test_concurrent_requests_and_n(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, n=2)
    results = await asyncio.gather(*(
        collect(llm, prompt(llm, q), params, f"c{i}")
        for i, q in enumerate(["Hi!", "Name a color.", "Count to five."])))
    for texts, tokens, finish in results:
        assert set(finish) == {0, 1} and tokens[0] == tokens[1]
    await wait_idle(llm)


async def test_leaving_early_aborts_and_frees_blocks(llm):
    ids = prompt(llm, "Tell me a long story about dragons.")
    stream = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=200), "leaver")
    async for _ in stream:
        break
    await stream.aclose()
    await wait_idle(llm)
    llm.engine.scheduler.block_manager.check_integrity()


async def test_cancelled_task_aborts(llm):
    ids = prompt(llm, "Tell me a long story about knights.")
    task = asyncio.create_task(collect(llm, ids, SamplingParams(max_tokens=200), "cancelled"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(llm)


async def test_bad_prompt_raises_before_streaming(llm):
    with pytest.raises(PromptError):
        async for _ in llm.generate([], SamplingParams(), "empty"):
            pass
    assert llm.is_healthy()


def test_the_step_thread_builds_the_engine_and_build_errors_reach_the_caller():
    threads = []

    def build():
        threads.append(threading.current_thread().name)
        raise FileNotFoundError("no model at /nowhere")

    with pytest.raises(FileNotFoundError, match="no model at /nowhere"):
        AsyncLLM(build)
    assert threads == ["tokenmill-step"]
