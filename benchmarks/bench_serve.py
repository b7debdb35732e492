"""The server end to end: a real `tokenmill serve` on the default model, driven over HTTP.

Streams chat completions (temperature 0, ignore_eos, fixed output lengths) and reports, for
batch 1 and for 16 concurrent clients: output tokens/s over the whole run, and the median time to
first token and inter-token latency seen by the clients. This is what the offline benchmark
(bench_offline.py) measures without HTTP, SSE and the step thread.

    .venv/bin/python benchmarks/bench_serve.py [--tokens 128] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

import httpx

from live_server import live_server
from tokenmill.models.default import DEFAULT_MODEL_ID, default_model_path

PROMPTS = ["Write a long story about a cat.", "Explain how rain forms.",
           "List ten uses of a paperclip.", "Describe the city of Paris in detail."]


async def one_stream(client: httpx.AsyncClient, prompt: str, tokens: int) -> tuple[int, float,
                                                                                   list[float]]:
    """(output tokens, time to first token, gaps between content chunks) of one request."""
    body = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    gaps = [b - a for a, b in zip(times, times[1:])]
    return usage["completion_tokens"], times[0] - start, gaps


async def run_load(base_url: str, concurrency: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await one_stream(client, PROMPTS[0], 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*[one_stream(client, PROMPTS[i % len(PROMPTS)], tokens)
                                         for i in range(concurrency)])
        elapsed = time.perf_counter() - start
    return {
        "tokens/s": sum(r[0] for r in results) / elapsed,
        "TTFT median ms": 1000 * statistics.median(r[1] for r in results),
        "ITL median ms": 1000 * statistics.median(g for r in results for g in r[2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    options = ("--max-model-len", "2048", "--kv-cache-gib", "1")
    with tempfile.TemporaryDirectory() as home, \
            live_server(default_model_path(), home, *options) as base_url:
        for concurrency in (1, args.concurrency):
            figures = asyncio.run(run_load(base_url, concurrency, args.tokens))
            shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
            print(f"concurrency {concurrency:>2}: {shown}", flush=True)


if __name__ == "__main__":
    main()
