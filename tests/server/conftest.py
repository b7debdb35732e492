"""A real `tokenmill serve` subprocess on loopback with the default model, shared by the session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from server_live import (MAX_BODY_BYTES, MAX_MODEL_LEN, STARTUP_TIMEOUT_S, Server, free_port,
                         tokenmill_command)


@pytest.fixture(scope="session")
def server(default_model_path, tmp_path_factory):
    """Start the server (the model comes from the real $TOKENMILL_HOME; its own home is a tmp
    dir, so the admin key is created fresh), wait on /health, and SIGTERM it at the end."""
    home = tmp_path_factory.mktemp("tokenmill_home")
    port = free_port()
    stdout_path = home / "server.log"
    env = dict(os.environ, TOKENMILL_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = tokenmill_command() + [
        "serve", "--model", str(default_model_path), "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY_BYTES),
        "--kv-cache-gib", "0.25", "--drain-timeout", "20"]
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
    key = (home / "admin.key").read_text().strip()
    yield Server(base_url, key, home, proc, stdout_path)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def node_openai(tmp_path_factory) -> Path:
    """A directory whose node_modules has the official `openai` npm package (git-ignored)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not installed: cannot run the seed pages' JavaScript example")
    js_dir = Path(__file__).parent / "js"
    if not (js_dir / "node_modules" / "openai" / "package.json").exists():
        proc = subprocess.run([npm, "install", "--no-save", "--no-package-lock", "--no-audit",
                               "--no-fund", "--prefix", str(js_dir), "openai"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"`npm install openai` failed (offline?): {proc.stderr[-500:]}")
    return js_dir
