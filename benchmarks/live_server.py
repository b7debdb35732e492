"""A `tokenmill serve` subprocess for the benchmarks that drive the server over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model: Path, home: str, *options: str, auth: bool = False) -> Iterator[str]:
    """Start `tokenmill serve` in TOKENMILL_HOME=home (with `--no-auth` unless `auth`: then keys
    and the usage ledger are on, the admin key in home/admin.key), wait for /health to answer
    200, yield the base URL; SIGTERM it on exit."""
    port = free_port()
    tokenmill = Path(sys.executable).with_name("tokenmill")
    proc = subprocess.Popen(
        [str(tokenmill), "serve", "--model", str(model), "--port", str(port),
         *([] if auth else ["--no-auth"]), *options],
        env=dict(os.environ, TOKENMILL_HOME=home), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        while not _healthy(base_url):
            if proc.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {proc.returncode}")
            time.sleep(0.1)
        yield base_url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
