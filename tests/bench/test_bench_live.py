"""`tokenmill bench` end to end: the CLI against a real `tokenmill serve` of the default model
(keys on, the key from $TOKENMILL_API_KEY), compared with the same server under a second name
through --compare, so that both paths run for real; its JSON holds exact token counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))  # server_live

from server_live import MODEL_ID, start_server, stop_server, tokenmill_command  # noqa: E402


@pytest.fixture(scope="module")
def bench_server(default_model_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("bench_home")
    running = start_server(home, ["--model", str(default_model_path), "--max-model-len", "512",
                                  "--kv-cache-gib", "0.25"])
    yield running
    stop_server(running)


def bench(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tokenmill_command() + ["bench", "--url", server.base_url, *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TOKENMILL_API_KEY=server.key,
                                   TOKENMILL_HOME=str(server.home)))


def test_bench_runs_both_targets_interleaved_and_counts_every_token(bench_server, tmp_path):
    out = tmp_path / "bench.json"
    peer = f"again={bench_server.base_url}"  # a --compare target: the same server
    done = bench(bench_server, "--compare", peer, "--concurrency", "1,2", "--num-prompts", "4",
                 "--input-len", "16", "--output-len", "8", "--output", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["cpu"] and report["workload"]["output_len"] == 8
    rows = [(r["target"], r["level"], r["completed"], r["failed"], r["output_tokens"])
            for r in report["results"]]
    assert rows == [("tokenmill", 1, 4, 0, 32), ("again", 1, 4, 0, 32),
                    ("tokenmill", 2, 4, 0, 32), ("again", 2, 4, 0, 32)]  # ignore_eos: all 8
    assert all(r["model"] == MODEL_ID and r["median_ttft_ms"] > 0 for r in report["results"])
    assert "== concurrency 2 ==" in done.stdout


def test_bench_reports_a_refused_key_as_errors_and_fails(bench_server):
    done = bench(bench_server, "--api-key", "sk-tm-wrong", "--num-prompts", "1")
    assert done.returncode == 1
    assert "cannot reach a target" in done.stderr and "401" in done.stderr


def test_bench_says_in_one_line_when_a_target_cannot_be_reached(bench_server):
    done = bench(bench_server, "--compare", "http://127.0.0.1:9", "--num-prompts", "1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "tokenmill bench: cannot reach a target:")
