"""A real `tokenmill serve` subprocess on loopback with the default model, shared by the session."""

from __future__ import annotations

import shutil
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
def client(server):
    """The official `openai` client on the shared server, with the admin key."""
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=server.key, max_retries=0, timeout=300)


@pytest.fixture
def http(server):
    """Raw HTTP to the shared server, with the admin key."""
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=300,
                      headers={"Authorization": f"Bearer {server.key}"}) as c:
        yield c


@pytest.fixture(scope="session")
def node_openai() -> Path:
    """The directory of the seed pages' JavaScript example, whose node_modules holds the official
    `openai` npm package (tests/server/js/package.json), vendored at set-up by `make test`: the
    test never reaches a registry itself, and is skipped where set-up could not vendor it."""
    js_dir = Path(__file__).parent / "js"
    if not shutil.which("node"):
        pytest.skip("node is not installed: cannot run the seed pages' JavaScript example")
    if not (js_dir / "node_modules" / "openai" / "package.json").exists():
        pytest.skip(f"the openai npm package is not in {js_dir}/node_modules: `make test` "
                    "vendors it where npm reaches its registry (or run: npm install --prefix "
                    f"{js_dir})")
    return js_dir
