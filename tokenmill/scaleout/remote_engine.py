"""`RemoteEngine`: an engine deployment's replicas seen by the ingress through `AsyncLLM`'s
interface, so the server (auth, limits, ledger, templates, streaming) runs unchanged in front of
them.

The ingress holds the model's tokenizer and config (read without its weights) and checks each
request as a local engine would before it leaves (`EngineFront`: the prompt against the
replicas' context, a constraint compiled once here, so both are 400s naming the parameter).
Each engine request is one streaming call to the deployment, routed by `PrefixAwareRouter`.
Closing the stream early (the client hung up) cancels the call, and Ray Serve cancels the
replica's generator, which aborts the engine request there. A replica dying under a request
(its actor killed, its node lost) fails just that request with `ReplicaLostError`, a 503; Ray
Serve starts a new replica and routes new requests to the living ones meanwhile.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from tokenmill.config import ModelConfig
from tokenmill.engine.async_llm import EngineDeadError
from tokenmill.engine.llm_engine import EngineStats, check_prompt
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.structured import GrammarCompiler
from tokenmill.sampling_params import SamplingParams

LOST = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


class ReplicaLostError(EngineDeadError):
    """The replica running a request died, or none could take it: a 503 for that request only
    (the deployment lives on)."""


@dataclass
class EngineFront:
    """The checks a local `LLMEngine` makes before admitting a request, made at the ingress."""

    vocab_size: int
    max_model_len: int  # the replicas' resolved context
    grammars: GrammarCompiler

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_token_ids, params, self.vocab_size, self.max_model_len)


class RemoteEngine:
    def __init__(self, handle, described: dict, tokenizer: Any, model_config: ModelConfig):
        """`handle`: the engine deployment's; `described`: what a replica's `describe` returned
        (its resolved context, vocabulary and block size)."""
        self._handle = handle.options(stream=True)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = described["max_model_len"]
        self.block_size = described["block_size"]
        self.engine = EngineFront(described["vocab_size"], self.max_model_len,
                                  GrammarCompiler(tokenizer, described["vocab_size"],
                                                  tuple(described["eos_token_ids"])))
        self._in_flight = 0  # engine requests this ingress has open on the replicas
        self._closed = False

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """As `AsyncLLM.generate`: output deltas of all n choices, the replica's request aborted
        if the consumer stops early; `ReplicaLostError` if its replica dies."""
        if self._closed:
            raise EngineDeadError("the engine deployment was shut down")
        self.engine.check_prompt(prompt_token_ids, params)
        if params.structured is not None:  # raises GrammarError here, before any replica call
            await asyncio.to_thread(self.engine.grammars.compile, params.structured)
        response = self._handle.generate.remote(list(prompt_token_ids), params, request_id)
        self._in_flight += 1
        try:
            async for out in response:
                yield out
        except RayTaskError as exc:  # the replica raised: the engine's own error, as it was
            raise exc.cause from None
        except LOST as exc:
            raise ReplicaLostError(f"the engine replica serving this request was lost "
                                   f"({type(exc).__name__}); retry") from None
        finally:
            self._in_flight -= 1
            response.cancel()  # a no-op once finished; else aborts it on the replica

    def stats(self) -> EngineStats:
        """What this ingress knows: its requests open on the replicas. Each replica's queue and
        KV usage are its own (`EngineReplica.stats`, Ray Serve's replica metrics)."""
        return EngineStats(num_running=self._in_flight, num_waiting=0, kv_cache_usage=math.nan)

    def is_healthy(self) -> bool:
        """Replicas that die are replaced by Ray Serve; the ingress stays healthy until shut
        down (a request meeting no replica is a 503 of its own)."""
        return not self._closed

    async def shutdown(self) -> None:
        """Refuse new requests. The replicas belong to the deployment and outlive this handle:
        whoever deployed them deletes them (`cluster.stop_cluster`, or Ray Serve when the
        application is deleted)."""
        self._closed = True
