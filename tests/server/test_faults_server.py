"""A real server through faults in its own engine (tests/server/faulty_serve.py injects them):
a step that fails costs its request alone, and steps failing again and again end the process
with a non-zero status instead of leaving it up answering 503."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from faulty_serve import FAULT_PROMPT
from server_live import MODEL_ID, start_server

LAUNCHER = [sys.executable, str(Path(__file__).with_name("faulty_serve.py"))]


@pytest.fixture
def faulty_server(default_model_path, tmp_path):
    server = start_server(tmp_path, [
        "--model", str(default_model_path), "--max-model-len", "512", "--kv-cache-gib", "0.25",
        "--max-step-failures", "3", "--step-failure-window", "600"], command=LAUNCHER)
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def completion(server, prompt, stream: bool = False) -> httpx.Response:
    return httpx.post(server.v1 + "/completions", timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"},
                      json={"model": MODEL_ID, "prompt": prompt, "max_tokens": 4,
                            "temperature": 0, "stream": stream})


def test_a_failed_step_fails_its_request_alone_then_repeated_failures_end_the_process(
        faulty_server):
    server = faulty_server
    r = completion(server, FAULT_PROMPT)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_step_failed"
    assert "injected" not in r.text
    ok = completion(server, "The sky is")
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    streamed = completion(server, FAULT_PROMPT, stream=True)
    assert streamed.status_code == 200
    assert '"code":"engine_step_failed"' in streamed.text
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    usage = httpx.get(server.v1 + "/usage", headers={"Authorization": f"Bearer {server.key}"},
                      timeout=30).json()["data"]
    assert sorted(row["status"] for row in usage) == ["completed", "error", "error"]

    third = completion(server, FAULT_PROMPT)  # the third failure in the window: dead
    assert third.status_code in (500, 503)
    assert server.proc.wait(timeout=60) == 3
    log = server.output()
    assert log.count("injected fault") >= 3  # each failure's traceback is in the log
    assert "the engine of SmolLM2-135M-Instruct is dead" in log
