"""Time from `tokenmill serve` to the first 200 from /health, on the default model.

Runs the server twice in a fresh $TOKENMILL_HOME: the first start converts the GGUF's config and
tokenizer (cold), the second reads them from the cache (warm). Prints seconds for each.

    .venv/bin/python benchmarks/bench_startup.py [--runs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from live_server import live_server
from tokenmill.models.default import default_model_path


def time_to_healthy(model: Path, home: str) -> float:
    start = time.perf_counter()
    with live_server(model, home):
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    model = default_model_path()
    with tempfile.TemporaryDirectory() as home:
        for run in range(args.runs):
            label = "cold (converts the GGUF metadata)" if run == 0 else "warm (cached)"
            print(f"start {run + 1}, {label}: {time_to_healthy(model, home):.1f} s", flush=True)


if __name__ == "__main__":
    main()
