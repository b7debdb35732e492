"""ModelRunner over a tiny random Llama: a hand-driven schedule of chunked prefills and decodes
must give each request the tokens transformers' greedy search gives it alone."""

import pytest
import torch

from tokenmill.config import CacheConfig
from tokenmill.engine.outputs import ScheduledRequest, SchedulerOutput
from tokenmill.engine.request import Request
from tokenmill.models.loader import load_model
from tokenmill.runner.model_runner import ModelRunner, kv_bytes_per_token
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), torch.float32, CPU)


def request(rid, prompt, blocks):
    return Request(rid, list(prompt), GREEDY, block_ids=list(blocks))


def step(runner, plan):
    """Run one step of (request, num_new_tokens), then advance as the scheduler would."""
    sched = SchedulerOutput([ScheduledRequest(r, n) for r, n in plan], sum(n for _, n in plan))
    before = [r.num_computed_tokens for r, _ in plan]
    out = runner.execute(sched)
    assert [r.num_computed_tokens for r, _ in plan] == before  # the runner mutates no request
    by_id = {r.request_id: r for r, _ in plan}
    for r, n in plan:
        r.num_computed_tokens += n
    for rid, token in zip(out.request_ids, out.sampled_token_ids, strict=True):
        by_id[rid].output_token_ids.append(token)
    assert out.logprobs == [None] * len(out.request_ids)
    return out.request_ids


def hf_greedy(tiny_llama_dir, prompt, n):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_chunked_mixed_batches_equal_greedy_alone(loaded, tiny_llama_dir):
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=40), CPU, torch.float32)
    a = request("a", [1, 17, 250, 3, 99, 42, 42, 7, 128, 201, 5, 66, 13], [9, 30, 2, 17, 5, 33])
    b = request("b", [1, 5, 6, 7, 8, 9, 10], [11, 0, 24, 6])
    c = request("c", [1, 200, 100, 50, 25, 12, 6, 3, 299], [39, 1, 20, 3, 8])
    assert step(runner, [(a, 8), (b, 7)]) == ["b"]  # a's first chunk does not sample
    assert step(runner, [(a, 5), (b, 1)]) == ["b", "a"]  # decodes first in the batch
    assert step(runner, [(a, 1), (b, 1), (c, 4)]) == ["a", "b"]
    assert step(runner, [(c, 5), (a, 1), (b, 1)]) == ["a", "b", "c"]
    while len(c.output_token_ids) < 6:
        step(runner, [(r, 1) for r in (a, b, c)])
    for r in (a, b, c):
        n = len(r.output_token_ids)
        assert r.output_token_ids == hf_greedy(tiny_llama_dir, r.prompt_token_ids, n), r.request_id


def test_step_without_sampling_rows_returns_nothing(loaded):
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=8), CPU, torch.float32)
    r = request("a", range(1, 11), [3, 1, 2])
    assert step(runner, [(r, 6)]) == []
    assert runner.execute(SchedulerOutput([], 0)).request_ids == []


def test_cache_is_allocated_once_from_the_resolved_config(loaded):
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=8), CPU, torch.float32)
    assert runner.kv_cache.shape == (2, 2, 8, 4, 2, 16)  # [layers, K/V, blocks, block, Hkv, D]
    assert runner.kv_cache.numel() * 4 == kv_bytes_per_token(loaded.config, torch.float32) * 32
    with pytest.raises(ValueError, match="unresolved"):
        ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=0), CPU, torch.float32)


def test_kv_bytes_per_token_of_the_default_model(loaded_default_model):
    # 30 layers x (K + V) x 3 kv heads x 64 dims x 4 bytes
    assert kv_bytes_per_token(loaded_default_model.config, torch.float32) == 30 * 2 * 3 * 64 * 4
    assert kv_bytes_per_token(loaded_default_model.config, torch.bfloat16) == 30 * 2 * 3 * 64 * 2
