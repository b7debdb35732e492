"""Sampler cost per call on CPU: B in (16, 32), V = 49152, float32 logits, 2 threads.

Cases: (a) temperature 1.0 only, (b) temperature 0.7 + top_p 0.9, (c) a mixed batch (half seeded,
top_k 40, top_p 0.9, min_p 0.05, all three penalties over ~300 tokens, logprobs=5 on a third),
(d) all greedy, (e) greedy + repetition_penalty 1.1 over a 4,000-token prompt and 200 outputs
(the penalties' cost grows with the context unless it is kept per request). Every call is a
decode step: each request's sampled token is appended to its output before the next (outside
the timing), as in the engine. Prints the median milliseconds per call.

    .venv/bin/python benchmarks/bench_sampler.py
"""

from __future__ import annotations

import statistics
import time

import torch

from tokenmill.engine.request import Request
from tokenmill.runner.sampler import Sampler
from tokenmill.sampling_params import SamplingParams

VOCAB = 49152


def mixed(i: int) -> dict:
    params = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, presence_penalty=0.5,
                  frequency_penalty=0.3, repetition_penalty=1.1)
    if i % 2 == 0:
        params["seed"] = 1000 + i
    if i % 3 == 0:
        params["logprobs"] = 5
    return params


CASES = {
    "a temperature=1.0": lambda i: dict(temperature=1.0),
    "b temp=0.7 top_p=0.9": lambda i: dict(temperature=0.7, top_p=0.9),
    "c mixed": mixed,
    "d greedy": lambda i: dict(temperature=0.0),
    "e greedy rep. 4.2k ctx": lambda i: dict(temperature=0.0, repetition_penalty=1.1),
}
CONTEXT = {"e greedy rep. 4.2k ctx": (4000, 200)}  # (prompt, output) tokens; default SHORT
SHORT = (200, 100)


def bench(batch: int, make_params, context: tuple[int, int], repeats: int = 30) -> float:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, VOCAB, generator=gen) * 3  # [B, V]
    prompt, output = context
    tokens = torch.randint(0, VOCAB, (batch, prompt + output), generator=gen).tolist()
    requests = [
        Request(f"r{i}", tokens[i][:prompt], SamplingParams(**make_params(i)),
                output_token_ids=tokens[i][prompt:])
        for i in range(batch)
    ]
    sampler = Sampler(VOCAB, (0,))
    times = []
    for step in range(repeats + 3):
        start = time.perf_counter()
        out = sampler(logits, requests)
        if step >= 3:  # warm-up calls are not counted
            times.append(time.perf_counter() - start)
        for r, token_id in zip(requests, out.token_ids):
            r.output_token_ids.append(token_id)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    print(f"{'case':24} {'B=16 ms':>9} {'B=32 ms':>9}")
    for name, make_params in CASES.items():
        context = CONTEXT.get(name, SHORT)
        print(f"{name:24} {bench(16, make_params, context):9.1f} "
              f"{bench(32, make_params, context):9.1f}")


if __name__ == "__main__":
    main()
