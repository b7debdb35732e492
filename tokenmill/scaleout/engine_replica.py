"""One engine replica: an `AsyncLLM` (its own step thread and KV cache) inside a Ray Serve
replica actor. The ingress reaches it only through `RemoteEngine` (remote_engine.py).

`generate` is a streaming method: Ray Serve carries each `RequestOutput` back as it is produced,
and when the caller stops reading (its client hung up) Ray cancels the generator here, which
aborts the engine request as a local consumer stopping would. What the replica has served from
its prefix cache is counted, for the router's tests and /metrics-style inspection (`stats`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

from ray import serve

from tokenmill.config import EngineConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineReplica:
    def __init__(self, config: EngineConfig, failures: dict):
        """`failures`: the step-failure bounds of `tokenmill serve` (max_step_failures,
        step_failure_window_s; absent: AsyncLLM's defaults). Past them the engine is dead,
        `check_health` fails and Ray Serve replaces this replica."""
        self.llm = AsyncLLM.from_config(config, **failures)
        self.replica = serve.get_replica_context().replica_tag
        self.requests = 0  # engine requests started here
        self.prompt_tokens = 0  # their prompt tokens
        self.cached_tokens = 0  # of those, served by this replica's prefix cache
        log.info("engine replica %s ready: context %d", self.replica, self.llm.max_model_len)

    def describe(self) -> dict:
        """What the ingress needs of the model to check and render requests itself."""
        config = self.llm.model_config
        return {"max_model_len": self.llm.max_model_len, "vocab_size": config.vocab_size,
                "eos_token_ids": list(config.eos_token_ids),
                "block_size": self.llm.engine.config.cache.block_size}

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self.requests += 1
        first = True
        async for out in self.llm.generate(prompt_token_ids, params, request_id):
            if first:  # every choice reports the prompt's figures: count them once
                self.prompt_tokens += out.num_prompt_tokens
                self.cached_tokens += out.num_cached_tokens
                first = False
            yield out

    def stats(self) -> dict:
        """The engine's load and this replica's prefix-cache record."""
        return {"replica": self.replica, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                **asdict(self.llm.stats())}

    def check_health(self) -> None:
        """Ray Serve's health check: a dead engine (steps failing again and again) gets this
        replica replaced."""
        if not self.llm.is_healthy():
            raise RuntimeError(f"the engine of replica {self.replica} is dead")
