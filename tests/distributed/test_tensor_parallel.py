"""Tensor parallelism over 2 CPU ranks (gloo, 1 torch thread each) against one rank, on every
family's tiny checkpoint (tests/tiny_models.py): the same greedy tokens, logits equal to float32
summation order, each rank's weights exactly its slices of the checkpoint's (safetensors and the
default model's GGUF), refusals, a worker's death, and a server of 2 ranks answering as one."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import httpx
import pytest
import torch
from server.server_live import start_server, stop_server  # tests/ is on sys.path

from tokenmill.config import EngineConfig
from tokenmill.distributed.parallel_linear import COLUMN_PARALLEL, ROW_PARALLEL, TensorShard
from tokenmill.distributed.worker import WorkerDiedError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.models.llama import MergedLinear
from tokenmill.models.loader import load_weights, open_model
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
FAMILIES = ("llama", "qwen2", "mistral", "mixtral")  # mistral with its sliding window
PROMPTS = ("The mill stood by the river for three hundred years.",
           "def tokenize(text):\n    return text.split()",
           "Paris, Berlin, Madrid, Rome,")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
# Each rank sums its own heads' and units' share, then the shares are added: another float32
# summation order than one rank's. Measured on the tiny models (logits up to ~45): at most
# 2.5e-4 apart (Mixtral; dense families 9e-5), i.e. 5.6e-6 of the largest logit.
RELATIVE_TOL = 1e-5


@pytest.fixture(autouse=True)
def restore_threads():
    """The engines set torch's thread count for this process: put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_engine(path, k: int, **options) -> LLMEngine:
    """An engine of K ranks with one torch thread each."""
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu",
                                  max_model_len=256, kv_cache_gib=0.01, num_threads=k,
                                  tensor_parallel_size=k, **options))


class RecordingSampler:
    """The runner's sampler, keeping the logits of every step."""

    def __init__(self, sampler):
        self.sampler, self.logits = sampler, []

    def __call__(self, logits, requests, masks):
        self.logits.append(logits.clone())
        return self.sampler(logits, requests, masks)

    def reset(self):
        self.sampler.reset()


def generate(engine: LLMEngine, prompts: list[list[int]]) -> tuple[dict, list]:
    """Greedy continuations of `prompts`, batched, and the logits of every step; then shuts the
    engine down."""
    engine.runner.sampler = recorder = RecordingSampler(engine.runner.sampler)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, GREEDY)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens, recorder.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_sample_one_ranks_tokens_from_its_logits(tiny_checkpoint, real_tokenizer,
                                                           family):
    path = tiny_checkpoint(family)
    prompts = [real_tokenizer.encode(p) for p in PROMPTS]
    one = make_engine(path, 1)
    expected_tokens, expected_logits = generate(one, prompts)
    two = make_engine(path, 2)
    try:
        assert two.runner.kv_cache.shape[-2] == one.runner.kv_cache.shape[-2] // 2  # Hkv / K
        assert two.config.cache.num_blocks == one.config.cache.num_blocks
        tokens, logits = generate(two, prompts)
    finally:
        two.shutdown()
    assert tokens == expected_tokens
    assert all(len(t) == 16 for t in tokens.values())
    assert len(logits) == len(expected_logits)  # the same steps: one prefill, then decodes
    for got, want in zip(logits, expected_logits):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=RELATIVE_TOL * scale)
    assert [p.exitcode for p in two.workers.ranks.processes] == [0]  # stopped by the message


def shard_weights(loaded) -> dict[str, torch.Tensor]:
    """A loaded model's parameters by checkpoint name, each stacked projection as its rows."""
    out = {}
    for name, module in loaded.model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, p in module.named_parameters(recurse=False):
            if isinstance(module, MergedLinear):
                parent = name.rpartition(".")[0]
                out |= {f"{parent}.{s}.{attr}": p.data[module.rows(s)] for s in module.shards}
            else:
                out[prefix + attr] = p.data
    return out


def assert_ranks_hold_their_slices(spec: str, k: int) -> None:
    whole = shard_weights(load_weights(open_model(spec), torch.float32, CPU))
    ranks = [shard_weights(load_weights(open_model(spec).sharded(TensorShard(r, k)),
                                        torch.float32, CPU)) for r in range(k)]
    for name, weight in whole.items():
        module = name.rsplit(".", 2)[-2]
        dim = 0 if module in COLUMN_PARALLEL else 1 if module in ROW_PARALLEL else None
        parts = [rank[name] for rank in ranks]
        if dim is None:  # replicated
            assert all(torch.equal(part, weight) for part in parts), name
        else:
            assert all(part.shape[dim] == weight.shape[dim] // k for part in parts), name
            assert torch.equal(torch.cat(parts, dim), weight), name


@pytest.mark.parametrize("family", ("qwen2", "mixtral"))
def test_each_rank_loads_its_slices_of_a_checkpoint(tiny_checkpoint, family):
    assert_ranks_hold_their_slices(str(tiny_checkpoint(family)), 2)


def test_each_rank_loads_its_slices_of_the_default_gguf(default_model_path):
    """The default model (9 query heads, 3 KV heads, q/k un-permuted by the loader) over 3."""
    assert_ranks_hold_their_slices(str(default_model_path), 3)


def test_a_size_that_does_not_divide_the_heads_is_refused_before_any_worker(tiny_checkpoint,
                                                                             default_model_path):
    with pytest.raises(ValueError, match=r"key-value heads \(2; .*: 1, 2 would"):
        make_engine(tiny_checkpoint("llama"), 4)  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"attention heads \(9\).*: 1, 3 would"):
        make_engine(default_model_path, 2)


def test_quantized_linears_run_sharded(tiny_checkpoint, real_tokenizer, tmp_path, monkeypatch):
    """A quantization plan applies to each rank's own (smaller) linears: int8 over 2 ranks
    samples what int8 over one does (int8's per-row scales of o_proj and down_proj then cover
    a rank's half row, so logits are close, not equal).

    Which kernel runs at which row count is measured (runner/linear_plan.py), and a measurement
    under load may pick bfloat16 for the prefill in one engine and int8 in the other. So the
    engines first measure their plans, each measured plan is pinned to int8 at every row
    count, and the engines that are compared read those pinned plans."""
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))  # the plans measured, cached there
    path = tiny_checkpoint("llama")
    prompts = [real_tokenizer.encode(PROMPTS[0])]
    for k in (1, 2):
        make_engine(path, k, quantization="int8").shutdown()
    plans = sorted((tmp_path / "cache" / "linear-plans").glob("*.json"))
    assert len(plans) == 2  # one rank's shapes and threads; each of 2 ranks' (the same)
    for plan in plans:
        pinned = json.loads(plan.read_text()) | {"small": "int8", "large": "int8"}
        plan.write_text(json.dumps(pinned))
    expected, _ = generate(make_engine(path, 1, quantization="int8"), prompts)
    two = make_engine(path, 2, quantization="int8")
    try:
        tokens, _ = generate(two, prompts)
    finally:
        two.shutdown()
    assert tokens == expected


def test_workers_run_rank_0s_linear_plan_without_measuring(tiny_checkpoint, tmp_path,
                                                           monkeypatch, caplog, capfd):
    """Rank 0 measures the plan and rank 1 runs the one it was sent: its log (on this process's
    stderr, at rank 0's level) shows rank 0's plan and no measuring. No plan can be cached
    (the cache's directory is a file), so a rank that measured would say so."""
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "linear-plans").write_text("")
    caplog.set_level(logging.INFO)
    make_engine(tiny_checkpoint("llama"), 2, quantization="int8").shutdown()
    rank_0 = [r.getMessage() for r in caplog.records if r.name == "tokenmill.runner.model_runner"]
    worker = [line for line in capfd.readouterr().err.splitlines() if " tp1 " in line]
    assert any(m.startswith("measuring the linear kernels") for m in caplog.messages)
    assert not any("measuring the linear kernels" in line for line in worker)
    [plan] = [m for m in rank_0 if m.startswith("linears: ")]
    assert any(line.endswith(plan) for line in worker)


def test_rank_0_failing_before_its_plan_stops_the_workers_cleanly_with_its_own_error(
        tiny_checkpoint, tmp_path, monkeypatch, caplog, capfd):
    """Rank 0's own shard fails to load after the workers started: the caller gets that error,
    and rank 1, waiting for the linear plan, takes the stop message for what it is (no
    traceback of its own burying rank 0's)."""
    import tokenmill.engine.llm_engine as llm_engine

    def broken(*args):
        raise OSError("rank 0's shard is unreadable")

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    monkeypatch.setattr(llm_engine, "load_rank", broken)
    caplog.set_level(logging.INFO)  # the workers log at rank 0's level
    with pytest.raises(OSError, match="rank 0's shard is unreadable"):
        make_engine(tiny_checkpoint("llama"), 2, quantization="int8")
    err = capfd.readouterr().err
    assert "rank 1 stops: rank 0 stopped before the engine was ready" in err
    assert "Traceback" not in err


def test_a_dead_worker_fails_the_step_loudly(tiny_checkpoint, real_tokenizer):
    engine = make_engine(tiny_checkpoint("llama"), 2)
    try:
        engine.add_request("a", real_tokenizer.encode(PROMPTS[0]), GREEDY)
        engine.step()
        worker = engine.workers.ranks.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) exited with code "
                                                  r"-9"):
            engine.step()
        assert time.monotonic() - started < 10  # at once, not after the groups' timeout
    finally:
        engine.shutdown()


def test_a_server_of_two_ranks_answers_as_one_rank(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2")
    body = {"model": path.name, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Name three rivers."}]}
    answers = []
    for k in (1, 2):
        home = tmp_path / f"tp{k}"
        home.mkdir()
        server = start_server(home, ["--model", str(path), "--no-auth", "--kv-cache-gib", "0.01",
                                     "--max-model-len", "256", "--tensor-parallel-size", str(k)])
        try:
            reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
        finally:
            stop_server(server)
        if k == 2:
            assert "tensor parallelism over 2 CPU ranks: 1 torch threads each" in server.output()
            assert "rank 1 stops" not in server.output()  # ended by the stop message
    assert answers[1] == answers[0]
    assert answers[0]
