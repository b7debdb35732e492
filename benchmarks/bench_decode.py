"""Decode-step time of the default model through ModelRunner (a measurement, not a test).

    NT=2 Q=int4 .venv/bin/python benchmarks/bench_decode.py 1 16   # batch sizes; NT = torch
                                                        # threads, Q = --quantization,
                                                        # KV = the cache's dtype (default:
                                                        # as the engine chooses)
    PROF=1 ...                                                # also print a profiler table

Each request gets a random ~200-token prompt, prefilled alone, then B decode rows run per step.
Wall time is noisy when other processes share the cores; process CPU time is printed beside it.
"""

import os
import sys
import time

import torch

from tokenmill.config import CacheConfig
from tokenmill.engine.outputs import ScheduledRequest, SchedulerOutput
from tokenmill.engine.request import Request
from tokenmill.models.default import default_model_path
from tokenmill.models.loader import load_model
from tokenmill.runner.linear_plan import kv_cache_dtype
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


def decode_step(runner, reqs):
    out = runner.execute(SchedulerOutput([ScheduledRequest(r, 1) for r in reqs], len(reqs)))
    for r, token in zip(reqs, out.sampled_token_ids, strict=True):
        r.num_computed_tokens += 1
        r.output_token_ids.append(token)


def bench(runner, batch, ctx=200, steps=20, profile=False):
    g = torch.Generator().manual_seed(0)
    reqs = [Request(str(i), torch.randint(100, 40000, (ctx,), generator=g).tolist(), GREEDY,
                    block_ids=list(range(i * 40, i * 40 + 40))) for i in range(batch)]
    for r in reqs:
        out = runner.execute(SchedulerOutput([ScheduledRequest(r, ctx)], ctx))
        r.num_computed_tokens += ctx
        r.output_token_ids += out.sampled_token_ids
    times, cpu0 = [], time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        decode_step(runner, reqs)
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / steps
    med = sorted(times)[steps // 2]
    print(f"B={batch} ctx~{ctx}: median {med * 1e3:.1f} ms/step (min {min(times) * 1e3:.1f}), "
          f"{batch / med:.0f} tok/s; process CPU {cpu * 1e3:.1f} ms/step")
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            for _ in range(5):
                decode_step(runner, reqs)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    loaded = load_model(str(default_model_path()), torch.float32, torch.device("cpu"))
    quantization = os.environ.get("Q", "none")
    kv_dtype = getattr(torch, os.environ["KV"]) if "KV" in os.environ else \
        kv_cache_dtype(quantization, torch.float32)
    print(f"quantization {quantization}, KV cache {kv_dtype}")
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=2048),
                         torch.device("cpu"), torch.float32, quantization=quantization,
                         kv_dtype=kv_dtype)
    for b in map(int, sys.argv[1:] or ["1", "16"]):
        bench(runner, b, profile=bool(os.environ.get("PROF")))
