"""The engine end to end on the real default model, against transformers as the reference.

Greedy tokens must equal transformers' greedy tokens (float32, same GGUF) alone, inside a batch of
16 requests of mixed lengths that join and leave, with the prefix cache warm, and after preemption.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptError
from tokenmill.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime.",
    "Hi!",
    "Translate 'good morning' into Spanish, German and Italian.",
    "Why is the sky blue? Answer in one sentence.",
    "Name a famous physicist.",
    "Explain what a hash table is to a ten year old, with an example about a library.",
]
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def make_engine(loaded, path, **options) -> LLMEngine:
    options = {"max_model_len": 2048, "kv_cache_gib": 0.25, **options}
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", **options),
                     loaded=loaded)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
        late: dict[int, dict] | None = None) -> dict[str, dict]:
    """Step until done; `late[k]` requests join after step k. Checks integrity each step."""
    results: dict[str, dict] = {}

    def add(batch):
        for rid, (ids, params) in batch.items():
            engine.add_request(rid, ids, params)
            results[rid] = {"tokens": [], "text": "", "finish": None, "cached": 0}

    add(requests)
    step = 0
    while engine.has_unfinished_requests() or (late and step <= max(late)):
        if late and step in late:
            add(late[step])
        for out in engine.step():
            key = out.request_id if out.index == 0 else f"{out.request_id}#{out.index}"
            r = results.setdefault(key, {"tokens": [], "text": "", "finish": None, "cached": 0})
            r["tokens"] += out.new_token_ids
            r["text"] += out.text
            r["cached"] = out.num_cached_tokens
            if out.finished:
                r["finish"], r["stop_reason"] = out.finish_reason, out.stop_reason
        engine.check_integrity()
        step += 1
    assert engine.scheduler.kv_cache_usage == 0.0
    return results


@pytest.fixture(scope="module")
def engine(loaded_default_model, default_model_path):
    return make_engine(loaded_default_model, default_model_path)


@pytest.fixture(scope="module")
def prompts(engine):
    return [chat_ids(engine.tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(prompts, default_model_path):
    """transformers' greedy continuation of each prompt (float32, same GGUF)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_path.parent,
                                              gguf_file=default_model_path.name,
                                              dtype=torch.float32)
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=2, pad_token_id=2)
            refs.append(out[0, len(ids):].tolist())
    return refs


def test_greedy_equals_transformers_alone(engine, prompts, reference):
    for i, ids in enumerate(prompts[:4]):
        got = run(engine, {f"solo{i}": (ids, GREEDY)})[f"solo{i}"]
        assert got["tokens"] == reference[i]
        assert got["text"] == engine.tokenizer.decode(got["tokens"], skip_special_tokens=True)


def test_batch_of_16_mixed_lengths_joining_and_leaving(engine, prompts, reference):
    first = {f"a{i}": (ids, GREEDY) for i, ids in enumerate(prompts)}
    late = {3: {f"b{i}": (ids, GREEDY) for i, ids in enumerate(prompts[:4])},
            7: {f"c{i}": (ids, GREEDY) for i, ids in enumerate(prompts[4:], start=4)}}
    results = run(engine, first, late)
    assert len(results) == 16
    for rid, r in results.items():
        assert r["tokens"] == reference[int(rid[1:])], rid


def test_prefix_cache_warm_gives_same_tokens(engine, prompts, reference):
    cold = run(engine, {"cold": (prompts[7], GREEDY)})["cold"]
    warm = run(engine, {"warm": (prompts[7], GREEDY)})["warm"]
    assert warm["cached"] == (len(prompts[7]) - 1) // 16 * 16  # every full block but the last
    assert warm["cached"] > 0
    assert cold["tokens"] == warm["tokens"] == reference[7]


def tight_engine(loaded, path) -> tuple[LLMEngine, list[str]]:
    """An engine of 24 KV blocks of 16 tokens (no prefix cache), and the list its scheduler
    appends the id of every request it preempts to."""
    kv_bytes_per_block = 2 * 30 * 3 * 64 * 4 * 16
    engine = make_engine(loaded, path, max_model_len=256,
                         kv_cache_gib=24 * kv_bytes_per_block / (1 << 30),
                         enable_prefix_caching=False)
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        preempted.extend(r.request_id for r in out.preempted)
        return out

    engine.scheduler.schedule = spy
    return engine, preempted


def test_preemption_then_resume_gives_identical_output(loaded_default_model,
                                                       default_model_path, prompts, reference):
    # The 8 prompts (~40-60 tokens each) cannot all grow at once in 24 blocks.
    tiny, preempted = tight_engine(loaded_default_model, default_model_path)
    results = run(tiny, {f"p{i}": (ids, GREEDY) for i, ids in enumerate(prompts)})
    assert preempted, "the tiny cache should have forced a preemption"
    for rid, r in results.items():
        assert r["tokens"] == reference[int(rid[1:])], rid


@pytest.mark.parametrize("abort_after_steps", [0, 1, 3, 6])
def test_abort_at_any_moment_frees_everything(engine, prompts, abort_after_steps):
    long_prompt = prompts[7] * 12  # > one 512-token step budget: aborted mid-prefill at step 1
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, ids in enumerate([long_prompt, prompts[1], prompts[2]]):
        engine.add_request(f"x{i}", ids, params)
    for _ in range(abort_after_steps):
        engine.step()
        engine.scheduler.block_manager.check_integrity()
    finals = engine.abort("x0") + engine.abort("x1")
    assert [(o.request_id, o.finish_reason) for o in finals] == [("x0", "abort"), ("x1", "abort")]
    assert engine.abort("x0") == []  # twice is harmless
    while engine.has_unfinished_requests():
        engine.step()
    engine.scheduler.block_manager.check_integrity()
    assert engine.scheduler.kv_cache_usage == 0.0
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_n_choices_share_the_prompt_and_equal_greedy(engine, prompts, reference):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, n=3)
    results = run(engine, {"multi": (prompts[5], params)})
    assert [results[k]["tokens"] for k in ("multi", "multi#1", "multi#2")] == [reference[5]] * 3
    assert results["multi#2"]["cached"] >= 16  # siblings reuse the first choice's prompt blocks


def test_stop_string_across_tokens_is_not_emitted(engine, prompts):
    full = run(engine, {"full": (prompts[6], SamplingParams(temperature=0.0, max_tokens=24))})
    text = full["full"]["text"]
    stop = text[5:12]
    assert len(stop.strip()) > 2
    got = run(engine, {"s": (prompts[6], SamplingParams(temperature=0.0, max_tokens=24,
                                                        stop=(stop, "zzzz")))})["s"]
    assert got["text"] == text[:text.index(stop)]
    assert (got["finish"], got["stop_reason"]) == ("stop", stop)


def test_stop_token_id_ends_without_emitting_it(engine, prompts, reference):
    stop_id = reference[0][4]
    got = run(engine, {"t": (prompts[0], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                        stop_token_ids=(stop_id,)))})["t"]
    first = reference[0].index(stop_id)
    assert got["tokens"] == reference[0][:first + 1]
    assert got["text"] == engine.tokenizer.decode(reference[0][:first], skip_special_tokens=True)
    assert (got["finish"], got["stop_reason"]) == ("stop", stop_id)


def test_max_tokens_finishes_with_length(engine, prompts):
    got = run(engine, {"m": (prompts[2], SamplingParams(temperature=0.0, max_tokens=3))})["m"]
    assert len(got["tokens"]) == 3 and got["finish"] == "length"


def test_same_seed_same_output_whatever_shares_the_batch(engine, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=NEW_TOKENS)
    alone = run(engine, {"alone": (prompts[1], seeded)})["alone"]["tokens"]
    crowd = {f"other{i}": (ids, SamplingParams(temperature=0.8, max_tokens=NEW_TOKENS))
             for i, ids in enumerate(prompts[2:6])}
    crowd["seeded"] = (prompts[1], seeded)
    assert run(engine, crowd)["seeded"]["tokens"] == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=NEW_TOKENS)
    assert run(engine, {"x": (prompts[1], other_seed)})["x"]["tokens"] != alone


def test_logprobs_are_returned_per_token(engine, prompts, reference):
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5)
    engine.add_request("lp", prompts[0], params)
    logprobs = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            logprobs += out.logprobs
    assert [lp.token_id for lp in logprobs] == reference[0][:4]
    for lp in logprobs:
        assert len(lp.top) == 5
        assert lp.top[0] == (lp.token_id, lp.logprob)  # greedy: the sampled token is the top one
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)


def test_bad_prompts_are_refused_before_queueing(engine):
    with pytest.raises(PromptError):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(PromptError):
        engine.add_request("oov", [1, 10**6], GREEDY)
    with pytest.raises(PromptError):
        engine.add_request("long", [1] * 2040, SamplingParams(max_tokens=16))
    assert not engine.has_unfinished_requests()
