"""The constants and helpers of the live-server tests (imported by conftest and the tests)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

MODEL_ID = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
MAX_BODY_BYTES = 65536
STARTUP_TIMEOUT_S = 240


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:<port>
    key: str  # the admin key created on first start
    home: Path  # $TOKENMILL_HOME of the server
    proc: subprocess.Popen
    stdout_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokenmill_command() -> list[str]:
    script = Path(sys.executable).parent / "tokenmill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tokenmill.cli"]


def start_server(home: Path, args: list[str], command: list[str] | None = None,
                 quantization: str | None = "none") -> Server:
    """`tokenmill serve ARGS --quantization QUANTIZATION` (or `COMMAND serve ...`) on a free
    loopback port with $TOKENMILL_HOME=home (QUANTIZATION: by default the float32 reference
    the tests compare with; None: the CLI's default), once /health answers 200 (the admin key
    is read when auth is on); fails the test with the log otherwise."""
    if quantization is not None:
        args = [*args, "--quantization", quantization]
    port = free_port()
    stdout_path = home / "server.log"
    env = dict(os.environ, TOKENMILL_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = (command or tokenmill_command()) + ["serve", "--host", "127.0.0.1", "--port",
                                              str(port), *args]
    with open(stdout_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"tokenmill serve exited with {proc.returncode}:\n"
                        f"{stdout_path.read_text()[-4000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n"
                        f"{stdout_path.read_text()[-4000:]}")
        time.sleep(0.5)
    key_file = home / "admin.key"
    key = key_file.read_text().strip() if key_file.exists() else ""
    return Server(base_url, key, home, proc, stdout_path)


def stop_server(server: Server) -> None:
    """SIGTERM (the drain path), then SIGKILL if it has not exited within a minute."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_key(db: str, home, name: str, *options: str) -> str:
    """A new API key (`tokenmill keys create --name NAME OPTIONS`) in the store at `db`."""
    done = subprocess.run(tokenmill_command() + ["keys", "create", "--name", name, *options,
                                                 "--db", db],
                          env={"TOKENMILL_HOME": str(home), "PATH": "/usr/bin:/bin"},
                          check=True, capture_output=True, text=True, timeout=120)
    return done.stdout.splitlines()[-1]


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A prefix of the caller's own in the Redis at 127.0.0.1:6379 (skipping where it is not
    reachable); every key under it is deleted afterwards."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"tokenmill-test:{secrets.token_hex(6)}:"  # nothing from an earlier run
    try:
        yield prefix
    finally:
        import redis

        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        names = list(client.scan_iter(match=f"{prefix}*"))
        if names:
            client.delete(*names)
        client.close()


def hang_up_streams(server: Server, count: int) -> None:
    """Start `count` long streams (900 tokens each, ignore_eos) at once and hang each up after
    its first few events; returns when all are closed."""
    def drop(i: int) -> None:
        with httpx.stream("POST", server.v1 + "/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {server.key}"},
                          json={"model": MODEL_ID, "stream": True, "max_tokens": 900,
                                "ignore_eos": True,
                                "messages": [{"role": "user", "content": f"Tell story {i}."}]}
                          ) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n == 6:
                    return  # leaving the block closes the connection: a hang-up

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)


def descendants_running(pid: int, *parts: str) -> list[psutil.Process]:
    """The processes under `pid` (a server's local Ray's actors, say) one of whose command-line
    arguments contains every one of `parts`."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if any(all(p in arg for p in parts) for arg in proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found
