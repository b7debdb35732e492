"""Prometheus metrics, in a registry owned by the app (never the process-global one).

Gauges are read from each served model's engine at scrape time (label `model`); counters and
histograms are fed by the serving layer as outputs arrive.
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("tokenmill_requests_running", "Requests in the engine's running batch",
                             ["model"], registry=r)
        self.waiting = Gauge("tokenmill_requests_waiting", "Requests queued in the engine",
                             ["model"], registry=r)
        self.kv_usage = Gauge("tokenmill_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                              ["model"], registry=r)
        self.in_flight = Gauge("tokenmill_http_requests_in_flight",
                               "Generation requests being served by the HTTP layer", registry=r)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=r)
        self.cached_tokens = Counter("tokenmill_cached_prompt_tokens",
                                     "Prompt tokens served by the prefix cache", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated",
                                         ["model"], registry=r)
        self.requests = Counter("tokenmill_requests", "Finished generation requests",
                                ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds",
                              "Arrival to first generated token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("tokenmill_inter_token_latency_seconds",
                             "Time between consecutive outputs of one choice",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self, models, in_flight: int) -> bytes:
        """The exposition text; `models` are the served models (id, engine)."""
        self.in_flight.set(in_flight)
        for model in models:
            stats = model.engine.stats()
            self.running.labels(model.id).set(stats.num_running)
            self.waiting.labels(model.id).set(stats.num_waiting)
            self.kv_usage.labels(model.id).set(stats.kv_cache_usage)
        return generate_latest(self.registry)
