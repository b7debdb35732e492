"""A bench run's figures from its requests' timings: exact arithmetic on made-up results."""

from __future__ import annotations

import pytest

from tokenmill.bench.metrics import RequestResult, summarize


def test_tpot_and_itl_come_from_the_stream_timings():
    r = RequestResult(ok=True, output_tokens=5, ttft=0.5, latency=1.3,
                      chunk_times=[0.5, 0.7, 0.9, 1.3])  # one chunk carried two tokens
    assert r.tpot == pytest.approx(0.2)  # (1.3 - 0.5) / (5 - 1)
    assert r.itls == pytest.approx([0.2, 0.2, 0.4])
    assert RequestResult(ok=True, output_tokens=1, ttft=0.5, latency=0.5).tpot is None


def test_a_run_sums_tokens_over_completed_requests_and_counts_errors_by_kind():
    done = [RequestResult(ok=True, prompt_tokens=10, output_tokens=4, ttft=t, latency=t + 0.3,
                          chunk_times=[t, t + 0.1, t + 0.2, t + 0.3]) for t in (0.1, 0.2, 0.3)]
    failed = [RequestResult(error="HTTP 429: slow down"), RequestResult(error="HTTP 429: slow "
                                                                              "down"),
              RequestResult(error="ReadTimeout")]
    s = summarize(done + failed, duration_s=2.0)
    assert (s["completed"], s["failed"]) == (3, 3)
    assert s["errors"] == {"HTTP 429: slow down": 2, "ReadTimeout": 1}
    assert (s["prompt_tokens"], s["output_tokens"]) == (30, 12)
    assert s["output_throughput"] == 6.0 and s["request_throughput"] == 1.5
    assert s["total_token_throughput"] == 21.0
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p99_ttft_ms"] == pytest.approx(298)  # numpy's linear interpolation
    assert s["median_tpot_ms"] == pytest.approx(100) and s["median_itl_ms"] == pytest.approx(100)
    assert s["median_e2el_ms"] == pytest.approx(500)


def test_a_run_with_no_completed_request_has_no_latency_figures():
    s = summarize([RequestResult(error="ConnectError")], duration_s=1.0)
    assert s["completed"] == 0 and s["output_throughput"] == 0
    assert s["median_ttft_ms"] is None and s["p99_itl_ms"] is None
