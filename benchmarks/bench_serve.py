"""The server end to end: a real `tokenmill serve` on the default model, driven over HTTP.

Streams chat completions (temperature 0, ignore_eos, fixed output lengths) and reports, for
batch 1 and for 16 concurrent clients: output tokens/s over the whole run, and the median time to
first token and inter-token latency seen by the clients. This is what the offline benchmark
(bench_offline.py) measures without HTTP, SSE and the step thread.

    .venv/bin/python benchmarks/bench_serve.py [--tokens 128] [--concurrency 16]

With --compare-ledger: what keys and the usage ledger cost, as closed loops of 16 clients
(--requests each, --tokens output tokens) without keys and with them on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/bench_serve.py --compare-ledger --tokens 32 --requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

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


async def closed_loop(base_url: str, key: str | None, clients: int, requests: int,
                      tokens: int) -> dict:
    """`clients` clients, each sending `requests` streams one after the other."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers) as client:
        await one_stream(client, PROMPTS[0], 4)  # warm-up

        async def one_client(i: int) -> int:
            made = 0
            for turn in range(requests):
                made += (await one_stream(client, PROMPTS[(i + turn) % len(PROMPTS)], tokens))[0]
            return made

        start = time.perf_counter()
        made = await asyncio.gather(*[one_client(i) for i in range(clients)])
        elapsed = time.perf_counter() - start
    return {"tokens/s": sum(made) / elapsed, "requests/s": clients * requests / elapsed}


def pg_database() -> tuple[str, object] | None:
    """A throwaway PostgreSQL database at 127.0.0.1:5432 (its URL and a function dropping it),
    or None where PostgreSQL is not reachable."""
    from sqlalchemy import create_engine, exc, text

    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test",
                          isolation_level="AUTOCOMMIT")
    name = f"tokenmill_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except exc.OperationalError:
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"postgresql://postgres@127.0.0.1:5432/{name}", drop


def compare_ledger(args, options: tuple[str, ...]) -> None:
    """The same closed loop without keys (--no-auth: no auth, limiter or ledger) and with them
    over SQLite and PostgreSQL (a key with rpm, tpm and a budget, so every request is admitted
    by the limiter, reads its spend and writes its record), `args.rounds` rounds in turn."""
    pg = pg_database()
    stores = {"no keys, no ledger": None, "ledger on SQLite": "sqlite"}
    if pg is not None:
        stores["ledger on PostgreSQL"] = pg[0]
    else:
        print("PostgreSQL is not reachable at 127.0.0.1:5432: measuring SQLite only")
    try:
        for round_ in range(1, args.rounds + 1):
            for label, store in stores.items():
                with tempfile.TemporaryDirectory() as home:
                    db = f"sqlite:///{home}/tokenmill.db" if store == "sqlite" else store
                    extra = ("--db", db) if db else ()
                    with live_server(default_model_path(), home, *options, *extra,
                                     auth=db is not None) as base_url:
                        key = limited_key(home, db) if db else None
                        figures = asyncio.run(closed_loop(base_url, key, args.concurrency,
                                                          args.requests, args.tokens))
                shown = ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
                print(f"round {round_}, {label}: {shown}", flush=True)
    finally:
        if pg is not None:
            pg[1]()


def limited_key(home: str, db: str) -> str:
    """A key with limits far above the load (admission runs, never refuses)."""
    tokenmill = Path(sys.executable).with_name("tokenmill")
    name = f"bench-{uuid.uuid4().hex[:8]}"  # the PostgreSQL store outlives one round
    done = subprocess.run([str(tokenmill), "keys", "create", "--name", name, "--rpm",
                           "1000000", "--tpm", "1000000000", "--budget", "1000", "--db", db],
                          env=dict(os.environ, TOKENMILL_HOME=home), check=True,
                          capture_output=True, text=True)
    return done.stdout.splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--compare-ledger", action="store_true",
                        help="closed loops without and with keys and the usage ledger")
    parser.add_argument("--requests", type=int, default=8,
                        help="requests per client in --compare-ledger")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --compare-ledger")
    args = parser.parse_args()
    options = ("--max-model-len", "2048", "--kv-cache-gib", "1")
    if args.compare_ledger:
        compare_ledger(args, options)
        return
    with tempfile.TemporaryDirectory() as home, \
            live_server(default_model_path(), home, *options) as base_url:
        for concurrency in (1, args.concurrency):
            figures = asyncio.run(run_load(base_url, concurrency, args.tokens))
            shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
            print(f"concurrency {concurrency:>2}: {shown}", flush=True)


if __name__ == "__main__":
    main()
