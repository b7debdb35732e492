"""The constants and helpers of the live-server tests (imported by conftest and the tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
