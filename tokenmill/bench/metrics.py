"""What one streamed request measured, and the figures of a run made of many: request and token
throughput, and time to first token (TTFT), time per output token (TPOT), inter-token latency
(ITL) and end-to-end latency, each as mean, median and 99th percentile, in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    """One request as the client saw it; times are seconds from its start."""

    ok: bool = False
    error: str | None = None  # why it failed: HTTP status and message, or the exception
    prompt_tokens: int = 0  # as the server's usage reported them
    output_tokens: int = 0  # the server's usage; else the content chunks received
    ttft: float | None = None  # to the first content chunk
    latency: float = 0.0  # to the end of the stream
    chunk_times: list[float] = field(default_factory=list)  # every content chunk's arrival

    @property
    def tpot(self) -> float | None:
        """Decode time per output token after the first; None below 2 tokens."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """The gaps between consecutive content chunks (a chunk may hold several tokens)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def _stats(values: list[float], name: str) -> dict[str, float | None]:
    """mean, median and p99 of `values` in milliseconds (None where there are none)."""
    if not values:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    ms = np.asarray(values, dtype=np.float64) * 1000
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """The figures of a run of `results` that took `duration_s` of wall time."""
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "completed": len(done), "failed": len(results) - len(done), "errors": errors,
        "duration_s": duration_s, "prompt_tokens": prompt, "output_tokens": output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output / duration_s,
        "total_token_throughput": (prompt + output) / duration_s,
        **_stats([r.ttft for r in done if r.ttft is not None], "ttft"),
        **_stats([r.tpot for r in done if r.tpot is not None], "tpot"),
        **_stats([gap for r in done for gap in r.itls], "itl"),
        **_stats([r.latency for r in done], "e2el"),
    }
