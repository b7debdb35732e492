"""Time from `tokenmill serve` to the first 200 from /health, on the default model.

Runs the server twice in a fresh $TOKENMILL_HOME: the first start converts the GGUF's config and
tokenizer (cold), the second reads them from the cache (warm). Prints seconds for each.

    .venv/bin/python benchmarks/bench_startup.py [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.models.default import default_model_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_healthy(model: Path, home: str) -> float:
    port = free_port()
    tokenmill = Path(sys.executable).with_name("tokenmill")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(tokenmill), "serve", "--model", str(model), "--port", str(port), "--no-auth"],
        env=dict(os.environ, TOKENMILL_HOME=home), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"tokenmill serve exited with {proc.returncode}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


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
