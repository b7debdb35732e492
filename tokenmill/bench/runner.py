"""Runs a workload against targets: closed loop (`concurrency` requests always in flight, the
next sent when one ends, like `vllm bench serve --max-concurrency`) or open loop (requests sent
at the times of a Poisson process of `rate` per second, whatever is in flight). Levels are
interleaved: every target runs a level before any runs the next, so that a machine's drift
lands on all of them alike."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm import tqdm

from tokenmill.bench.client import Target, stream_chat
from tokenmill.bench.metrics import RequestResult, summarize
from tokenmill.bench.workload import BenchRequest


@dataclass(frozen=True)
class Level:
    mode: str  # "concurrency" (closed loop) or "rate" (open loop, requests per second)
    value: float

    @property
    def label(self) -> str:
        return f"c={self.value:g}" if self.mode == "concurrency" else f"rate={self.value:g}/s"


async def run_closed(client, target: Target, requests: list[BenchRequest], concurrency: int,
                     temperature: float, progress) -> list[RequestResult]:
    queue = deque(enumerate(requests))
    results: list[RequestResult | None] = [None] * len(requests)

    async def worker():
        while queue:
            index, request = queue.popleft()
            results[index] = await stream_chat(client, target, request, temperature)
            progress.update(1)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return results


async def run_open(client, target: Target, requests: list[BenchRequest], rate: float,
                   temperature: float, seed: int, progress) -> list[RequestResult]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(requests))

    async def one(request):
        result = await stream_chat(client, target, request, temperature)
        progress.update(1)
        return result

    tasks = []
    for request, gap in zip(requests, gaps):
        tasks.append(asyncio.create_task(one(request)))
        await asyncio.sleep(gap)
    return list(await asyncio.gather(*tasks))


async def run_level(target: Target, requests: list[BenchRequest], level: Level, *,
                    temperature: float = 0.0, seed: int = 0, timeout_s: float = 600) -> dict:
    """The summary of `requests` run against `target` at `level`."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        with tqdm(total=len(requests), desc=f"{target.name} {level.label}", unit="req",
                  leave=False) as progress:
            start = time.perf_counter()
            if level.mode == "concurrency":
                results = await run_closed(client, target, requests, int(level.value),
                                           temperature, progress)
            else:
                results = await run_open(client, target, requests, level.value, temperature,
                                         seed, progress)
            duration = time.perf_counter() - start
    return {"target": target.name, "url": target.url, "model": target.model,
            "mode": level.mode, "level": level.value, **summarize(results, duration)}


async def run_all(targets: list[Target], requests: list[BenchRequest], levels: list[Level], *,
                  temperature: float = 0.0, seed: int = 0, rounds: int = 1,
                  on_result=None, counts: dict[Level, int] | None = None) -> list[dict]:
    """Every level against every target, interleaved, `rounds` times; a level runs the first
    `counts[level]` requests (default: all); `on_result(summary)` as each run ends."""
    summaries = []
    for _ in range(rounds):
        for level in levels:
            batch = requests[:counts[level]] if counts else requests
            for target in targets:
                summary = await run_level(target, batch, level, temperature=temperature,
                                          seed=seed)
                summaries.append(summary)
                if on_result is not None:
                    on_result(summary)
    return summaries
