"""What grammar masks cost a decode step (a measurement, not a test).

    .venv/bin/python benchmarks/bench_structured.py            # B = 16, 0 / 4 / 16 constrained
    .venv/bin/python benchmarks/bench_structured.py 32         # another batch size

The default model through ModelRunner, as benchmarks/bench_decode.py drives it: B requests with
~200-token prompts, prefilled, then decode steps of B rows. Constrained rows follow a nested JSON
schema (tests/engine/test_structured.py's); each step advances their grammars with the sampled
token, as the scheduler does, and a grammar that completes starts over. The shapes (0, B/4 and B
constrained rows) alternate for ROUNDS rounds, since a 2-core VM drifts by 10-20% between runs
of the same shape; printed per round and shape: the median step time, and the median time the
step waited for the masks after its forward (the part of the mask work the overlap did not
hide); then each shape's mean over the rounds. Then the masks alone: the same B rows' masks
computed sequentially on the calling thread, without a forward to hide behind.
"""

import json
import os
import platform
import sys
import time

import torch

from tokenmill.config import CacheConfig
from tokenmill.engine.outputs import ScheduledRequest, SchedulerOutput
from tokenmill.engine.request import Request
from tokenmill.engine.structured import GrammarCompiler
from tokenmill.models.default import default_model_path
from tokenmill.models.loader import load_model
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams, StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
STEPS = 30
ROUNDS = 3


class WaitTimer:
    """Wraps GrammarMasks.start so that the time the step spends in future.result() is known."""

    def __init__(self, masks):
        self.waits: list[float] = []
        start = masks.start

        def timed_start(requests):
            future = start(requests)
            if future is None:
                return None
            result = future.result

            def timed_result(*a, **kw):
                t = time.perf_counter()
                value = result(*a, **kw)
                self.waits.append(time.perf_counter() - t)
                return value

            future.result = timed_result
            return future

        masks.start = timed_start


def requests(batch: int, constrained: int, compiler: GrammarCompiler, ctx: int = 200):
    g = torch.Generator().manual_seed(0)
    spec = StructuredOutputs.json_schema(SCHEMA)
    reqs = []
    for i in range(batch):
        params = SamplingParams(temperature=0.0, max_tokens=None,
                                structured=spec if i < constrained else None)
        reqs.append(Request(str(i), torch.randint(100, 40000, (ctx,), generator=g).tolist(),
                            params, block_ids=list(range(i * 40, i * 40 + 40)),
                            grammar=compiler.grammar(spec) if i < constrained else None))
    return reqs


def step(runner, reqs, compiler):
    out = runner.execute(SchedulerOutput([ScheduledRequest(r, 1) for r in reqs], len(reqs)))
    for r, token in zip(reqs, out.sampled_token_ids, strict=True):
        r.num_computed_tokens += 1
        r.output_token_ids.append(token)
        if r.grammar is not None:
            r.grammar.accept(token)
            if r.grammar.is_terminated:
                r.grammar = compiler.grammar(r.sampling_params.structured)


def bench(runner, compiler, timer, batch: int, constrained: int) -> float:
    reqs = requests(batch, constrained, compiler)
    for r in reqs:
        out = runner.execute(SchedulerOutput([ScheduledRequest(r, r.num_prompt_tokens)],
                                             r.num_prompt_tokens))
        r.num_computed_tokens = r.num_prompt_tokens
        r.output_token_ids += out.sampled_token_ids
        if r.grammar is not None:
            r.grammar.accept(out.sampled_token_ids[0])
    timer.waits.clear()
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        step(runner, reqs, compiler)
        times.append(time.perf_counter() - t)
    med = sorted(times)[STEPS // 2] * 1e3
    wait = sorted(timer.waits)[len(timer.waits) // 2] * 1e3 if timer.waits else 0.0
    print(f"B={batch}, {constrained:2d} constrained: median step {med:6.1f} ms, "
          f"waiting on masks {wait:.2f} ms", flush=True)
    return med


def masks_alone(compiler, batch: int) -> float:
    """Median ms to compute `batch` masks one after another on this thread (no overlap)."""
    import llguidance.torch as llt

    grammars = [compiler.grammar(StructuredOutputs.json_schema(SCHEMA)) for _ in range(batch)]
    bitmask = llt.allocate_token_bitmask(batch, compiler.vocab_size)
    prefix = compiler.ll_tokenizer.tokenize_str('{"address":{"city":"Par')
    for g in grammars:
        assert g.matcher.consume_tokens(prefix)
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        for i, g in enumerate(grammars):
            llt.fill_next_token_bitmask(g.matcher, bitmask, i)
        times.append(time.perf_counter() - t)
    return sorted(times)[STEPS // 2] * 1e3


if __name__ == "__main__":
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    loaded = load_model(str(default_model_path()), torch.float32, torch.device("cpu"))
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=2048),
                         torch.device("cpu"), torch.float32)
    config = loaded.config
    compiler = GrammarCompiler(loaded.tokenizer, config.vocab_size, config.eos_token_ids)
    timer = WaitTimer(runner.grammar_masks)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"schema {len(json.dumps(SCHEMA))} bytes", flush=True)
    shapes = (0, batch // 4, batch)
    medians: dict[int, list[float]] = {k: [] for k in shapes}
    for _ in range(ROUNDS):
        for k in shapes:
            medians[k].append(bench(runner, compiler, timer, batch, k))
    base = sum(medians[0]) / ROUNDS
    for k in shapes:
        mean = sum(medians[k]) / ROUNDS
        print(f"B={batch}, {k:2d} constrained: mean of {ROUNDS} medians {mean:6.1f} ms, "
              f"{100 * (mean / base - 1):+.1f}% against the unconstrained batch")
    print(f"{batch} masks computed alone, one after another: {masks_alone(compiler, batch):.2f} ms")
