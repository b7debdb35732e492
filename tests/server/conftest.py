"""A real `tokenmill serve` subprocess on loopback with the default model, shared by the session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from server_live import MAX_BODY_BYTES, MAX_MODEL_LEN, start_server, stop_server


@pytest.fixture(scope="session")
def server(default_model_path, tmp_path_factory):
    """Start the server (the model comes from the real $TOKENMILL_HOME; its own home is a tmp
    dir, so the admin key is created fresh), wait on /health, and SIGTERM it at the end."""
    home = tmp_path_factory.mktemp("tokenmill_home")
    running = start_server(home, [
        "--model", str(default_model_path), "--max-model-len", str(MAX_MODEL_LEN),
        "--max-body-bytes", str(MAX_BODY_BYTES), "--kv-cache-gib", "0.25",
        "--drain-timeout", "20", "--max-pending-sequences", "1024"])
    yield running
    stop_server(running)


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
