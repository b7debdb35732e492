"""The constants and helpers of the live-server tests (imported by conftest and the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
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
