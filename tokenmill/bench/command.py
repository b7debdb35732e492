"""`tokenmill bench`: its arguments, and the run they describe (the workload made once, every
target run through it, the table printed and the JSON and plot written)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be 1 or more")
    return values


def _numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be above 0")
    return values


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench", help="load-test OpenAI-compatible servers: throughput, TTFT, TPOT, ITL")
    bench.add_argument("--url", default=DEFAULT_URL, help=f"the server (default: {DEFAULT_URL})")
    bench.add_argument("--model", help="the model id to request (default: the server's first)")
    bench.add_argument("--api-key", help="the API key sent to every target (default: "
                                         "$TOKENMILL_API_KEY; else $TOKENMILL_HOME/admin.key, "
                                         "sent to --url only, never to a --compare server)")
    bench.add_argument("--compare", action="append", default=[], metavar="[NAME=]URL",
                       help="another server run through the same workload, interleaved "
                            "(repeatable; its first listed model is used)")
    bench.add_argument("--dataset", choices=("random", "shared-prefix", "long-prompt", "chat"),
                       default="random")
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens (random)")
    bench.add_argument("--output-len", type=int, default=96, help="output tokens (ignore_eos)")
    bench.add_argument("--range-ratio", type=float, default=0.0,
                       help="lengths uniform in [len * (1 - r), len * (1 + r)] (default 0)")
    bench.add_argument("--prefix-len", type=int, default=1000,
                       help="shared system prompt tokens (shared-prefix)")
    bench.add_argument("--long-len", type=int, default=4000,
                       help="prompt tokens of the long prompts (long-prompt)")
    bench.add_argument("--long-every", type=int, default=8,
                       help="every this many requests, one is long (long-prompt)")
    loop = bench.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=_counts, default=None, metavar="C[,C...]",
                      help="closed-loop levels: requests always in flight (default 1,8,32)")
    loop.add_argument("--request-rate", type=_numbers, metavar="R[,R...]",
                      help="open-loop levels: Poisson arrivals, requests per second")
    bench.add_argument("--num-prompts", type=int, default=None,
                       help="requests per level (default: 4 x concurrency, at least 16; "
                            "32 per request rate)")
    bench.add_argument("--rounds", type=int, default=1, help="run every level this many times")
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--tokenizer", metavar="SPEC", help="GGUF file or checkpoint directory "
                                                            "whose tokenizer counts prompt "
                                                            "tokens (default: the default "
                                                            "model's)")
    bench.add_argument("--output", type=Path, metavar="FILE.json", help="write every summary")
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="throughput against latency per level (needs matplotlib)")
    bench.set_defaults(run=bench_command)
    return bench


def _api_keys(given: str | None) -> tuple[str | None, str | None]:
    """(the main target's key, the --compare targets' key): a key the user gave goes to every
    target; this machine's admin key, read from its file, only to the main one."""
    key = given or os.environ.get("TOKENMILL_API_KEY")
    if key:
        return key, key
    from tokenmill.models.default import tokenmill_home

    key_file = tokenmill_home() / "admin.key"
    return (key_file.read_text().strip() if key_file.is_file() else None), None


def _compare_target(spec: str) -> tuple[str, str]:
    """NAME=URL or URL (named by its host:port) -> (name, url)."""
    name, sep, url = spec.partition("=")
    if sep and not name.startswith("http"):
        return name, url
    return spec.split("//", 1)[-1].split("/", 1)[0], spec


def bench_command(args) -> int:
    from tokenmill.bench import report
    from tokenmill.bench.runner import Level, run_all
    from tokenmill.bench.workload import load_tokenizer, make_requests

    if args.plot:
        report.require_matplotlib()  # before the run, not after it
    if args.request_rate:
        levels = [Level("rate", r) for r in args.request_rate]
    else:
        levels = [Level("concurrency", c) for c in (args.concurrency or [1, 8, 32])]
    counts = {level: args.num_prompts or (max(16, 4 * int(level.value))
                                          if level.mode == "concurrency" else 32)
              for level in levels}
    per_level = max(counts.values())
    print(f"tokenmill bench: {args.dataset} prompts, "
          f"{', '.join(f'{counts[v]} at {v.label}' for v in levels)}; CPU: {report.cpu_model()}",
          flush=True)
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        requests = make_requests(args.dataset, per_level, tokenizer=tokenizer,
                                 input_len=args.input_len, output_len=args.output_len,
                                 range_ratio=args.range_ratio, prefix_len=args.prefix_len,
                                 long_len=args.long_len, long_every=args.long_every,
                                 seed=args.seed)
    except ValueError as exc:
        print(f"tokenmill bench: {exc}", file=sys.stderr)
        return 2
    try:
        targets = asyncio.run(_targets(args))
    except Exception as exc:  # unreachable, no model, refused key: said in one line
        print(f"tokenmill bench: cannot reach a target: {exc}", file=sys.stderr)
        return 1

    def show(summary: dict) -> None:
        print(f"{summary['target']} {summary['mode']}={summary['level']:g}: "
              f"{summary['output_throughput']:.1f} output tok/s, "
              f"{summary['completed']} completed, {summary['failed']} failed", flush=True)

    summaries = asyncio.run(run_all(targets, requests, levels, temperature=args.temperature,
                                    seed=args.seed, rounds=args.rounds, on_result=show,
                                    counts=counts))
    print()
    print(report.table(summaries))
    workload = {key: getattr(args, key) for key in (
        "dataset", "input_len", "output_len", "range_ratio", "prefix_len", "long_len",
        "long_every", "temperature", "seed", "rounds")}
    workload["requests_per_level"] = {v.label: n for v, n in counts.items()}
    if args.dataset != "shared-prefix":
        workload.pop("prefix_len")
    if args.dataset != "long-prompt":
        workload.pop("long_len")
        workload.pop("long_every")
    if args.output:
        report.write_json(args.output, summaries, workload)
        print(f"wrote {args.output}")
    if args.plot:
        report.plot(args.plot, summaries, f"{args.dataset}, {args.output_len} output tokens, "
                                          f"{report.cpu_model()}")
        print(f"wrote {args.plot}")
    return 1 if any(s["failed"] for s in summaries) else 0


async def _targets(args):
    import httpx

    from tokenmill.bench.client import resolve_target

    main_key, compare_key = _api_keys(args.api_key)
    async with httpx.AsyncClient(timeout=30) as client:
        targets = [await resolve_target(client, "tokenmill", args.url, args.model, main_key)]
        for spec in args.compare:
            name, url = _compare_target(spec)
            targets.append(await resolve_target(client, name, url, None, compare_key))
    return targets
