"""LLMEngine: the synchronous engine core, one step at a time.

    add_request -> Scheduler.waiting
    step():  Scheduler.schedule() -> ModelRunner.execute() -> Scheduler.update_from_output()
             -> OutputProcessor.process() -> list[RequestOutput]

It is driven by one thread only (the offline LLM, or AsyncLLM's step thread); nothing in it is
thread-safe, by design.

A step that raises after scheduling costs the user requests it ran, not the engine: each of their
unfinished choices gets a final output with finish_reason "error", their blocks are freed, and
the engine checks its invariants before serving on. This is sound because a step writes K/V only
at positions >= each scheduled request's num_computed_tokens, i.e. into blocks that request
alone holds and that are not in the prefix cache yet (a prefix hit and a sibling's shared prompt
blocks are full, computed blocks before those positions); and a block is hashed only once the
forward that filled it has finished. So the failed requests' blocks go back to the free queue
holding nothing anyone reads, and the other requests' state is untouched. Under tensor
parallelism a failed step is not recovered but raised (`step`): the workers' forward may have
stopped at another all-reduce than rank 0's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig, resolve_device, resolve_dtype
from tokenmill.distributed.parallel_linear import shard_config
from tokenmill.distributed.worker import (TensorParallelWorkers, WorkerSpec, engine_host,
                                          in_ray_placement_group, load_rank)
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.request import FINISH_REASONS, Request, RequestStatus, choice_id
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.structured import GrammarCompiler
from tokenmill.models.loader import LoadedModel, load_weights, open_model
from tokenmill.runner.cpu_linear import can_pack
from tokenmill.runner.linear_plan import kv_cache_dtype, resolve_quantization
from tokenmill.runner.model_runner import ModelRunner, kv_bytes_per_token
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """The prompt itself is unusable (empty, unknown token ids, or too long for the context)."""


def check_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int,
                 max_model_len: int) -> None:
    """Raise PromptError unless this prompt fits a model of `vocab_size` tokens and a context of
    `max_model_len` (what a remote engine's front checks too, before the request leaves)."""
    if not prompt_token_ids:
        raise PromptError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise PromptError(f"prompt token ids must be in [0, {vocab_size})")
    budget = len(prompt_token_ids) + (params.max_tokens or 1)
    if budget > max_model_len:
        raise PromptError(
            f"this model's maximum context length is {max_model_len} tokens; the "
            f"prompt has {len(prompt_token_ids)} and {params.max_tokens or 1} more were asked"
        )


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # requests holding KV blocks and scheduled every step
    num_waiting: int  # queued or preempted requests
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        """`loaded` reuses weights already in memory (read-only, so engines may share them).
        With `tensor_parallel_size` K > 1 the engine is rank 0: it starts ranks 1..K-1
        (distributed/worker.py), each loading its own shard, and `shutdown` stops them."""
        device = resolve_device(config.device)
        tp_size = config.tensor_parallel_size
        if tp_size > 1 and loaded is not None:
            raise ValueError("a tensor-parallel engine loads its own shards: pass no LoadedModel")
        threads = config.num_threads
        if tp_size > 1 and device.type == "cpu":  # K ranks share the cores
            threads = max(1, (threads or torch.get_num_threads()) // tp_size)
            log.info("tensor parallelism over %d CPU ranks: %d torch threads each", tp_size,
                     threads)
        if threads:
            torch.set_num_threads(threads)
        started = time.monotonic()
        owns_model = loaded is None
        if loaded is None:  # the dtype is chosen from the architecture, before any weight is read
            opened = open_model(config.model, config.max_model_len)
            num_parameters = opened.num_parameters()
            dtype = resolve_dtype(config.dtype, device, num_parameters)
            log.info("dtype %s -> %s: %.2fB parameters on %s", config.dtype,
                     str(dtype).removeprefix("torch."), num_parameters / 1e9, device)
            model_config, weight_bits = opened.config, opened.weight_bits
        else:  # weights already in memory fix the dtype (and so the KV cache's)
            dtype = next(loaded.model.parameters()).dtype
            model_config, weight_bits = loaded.config, loaded.weight_bits
        if tp_size > 1:
            shard_config(model_config, tp_size)  # refuses a K that does not divide the heads
        quantization, why = resolve_quantization(config.quantization, weight_bits,
                                                 can_pack(device, dtype))
        kv_dtype = kv_cache_dtype(quantization, dtype)
        if why or kv_dtype != dtype:
            log.info("quantization %s -> %s%s; KV cache %s", config.quantization, quantization,
                     f" ({why})" if why else "", str(kv_dtype).removeprefix("torch."))
        self.config = config.resolve(model_config, kv_bytes_per_token(model_config, kv_dtype))
        self.model_config = model_config
        self.max_model_len = self.config.scheduler.max_model_len
        self.workers: TensorParallelWorkers | None = None  # ranks 1..K-1 when K > 1
        if tp_size > 1:
            placed_by_ray = in_ray_placement_group()
            self.workers = TensorParallelWorkers(WorkerSpec(
                config.model, config.max_model_len, tp_size, dtype, device.type,
                torch.get_num_threads(), self.config.cache, quantization, kv_dtype,
                logging.getLogger().getEffectiveLevel(), engine_host(placed_by_ray),
                placed_by_ray))
        try:
            if self.workers is not None:
                loaded = load_rank(opened, self.workers.group, dtype, device)
            elif loaded is None:
                loaded = load_weights(opened, dtype, device)
            workers = self.workers
            self.runner = ModelRunner(loaded, self.config.cache, device, dtype, owns_model,
                                      quantization, kv_dtype,
                                      None if workers is None else workers.broadcast,
                                      None if workers is None else workers.share_plan)
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = loaded.tokenizer
        self.scheduler = Scheduler(self.config.scheduler, self.config.cache,
                                   loaded.config.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, loaded.config.vocab_size,
                                        loaded.config.eos_token_ids)
        log.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens, context %d, in %.1fs",
            loaded.config.architecture, device, str(dtype).removeprefix("torch."),
            self.config.cache.num_blocks, self.config.cache.block_size, self.max_model_len,
            time.monotonic() - started,
        )

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError unless this prompt can be served; pure, safe from any thread."""
        check_prompt(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Queue one user request; n > 1 fans out into n choices sharing the prompt's blocks.
        All or nothing: if it raises, nothing of the request stays in the engine. A constraint
        that does not compile raises GrammarError (compile it beforehand, off the step thread,
        with `self.grammars.compile`: AsyncLLM does)."""
        if self.output_processor.has_group(request_id):
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_prompt(prompt_token_ids, params)
        first: Request | None = None
        choices = []
        for index in range(params.n):
            structured = params.structured
            grammar = None if structured is None else self.grammars.grammar(structured)
            req = Request(choice_id(request_id, index), list(prompt_token_ids), params,
                          group_id=request_id, index=index, prefix_source=first, grammar=grammar)
            first = first or req
            choices.append(req)
        self.output_processor.add(choices)
        queued: list[str] = []
        try:
            for req in choices:
                self.scheduler.add_request(req)
                queued.append(req.request_id)
        except BaseException:
            self.scheduler.finish_requests(queued, RequestStatus.FINISHED_ABORTED)
            self.output_processor.remove(request_id)
            raise

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Abort every unfinished choice of a user request; returns their final outputs."""
        return self._end(request_id, RequestStatus.FINISHED_ABORTED)

    def step(self) -> list[RequestOutput]:
        """Run one step; returns its outputs. If it fails after scheduling, the user requests it
        ran are ended (see the module docstring) and their final "error" outputs returned: only
        a failed step returns outputs with finish_reason "error", and it returns at least one.
        A failure of the scheduler itself, or of that recovery, propagates: the engine's state
        is then unknown and it must not be stepped again. So does any failure of a
        tensor-parallel step (a dead worker as WorkerDiedError): the ranks may be out of step."""
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            return []
        try:
            runner_out = self.runner.execute(sched_out)
            updated = self.scheduler.update_from_output(sched_out, runner_out)
            outputs, stopped = self.output_processor.process(updated, runner_out)
            if stopped:  # stop strings end requests after the scheduler has seen the token
                self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        except Exception as exc:
            if self.workers is not None:  # the ranks may be out of step: fatal, not recovered
                self.workers.check(exc)  # a worker that died: which, and why
                raise
            group_ids = list(dict.fromkeys(s.request.group_id for s in sched_out.scheduled))
            log.exception("a step failed; ending the %d requests it ran: %s", len(group_ids),
                          ", ".join(group_ids))
            return self._fail(group_ids)
        self.output_processor.commit(outputs)
        return outputs

    def _fail(self, group_ids: list[str]) -> list[RequestOutput]:
        """End the user requests of a failed step, drop the runner's per-request state, and
        check that the engine is consistent again."""
        outputs = [out for group_id in group_ids
                   for out in self._end(group_id, RequestStatus.FINISHED_ERROR)]
        self.runner.reset_request_state()
        self.check_integrity()
        return outputs

    def _end(self, group_id: str, status: RequestStatus) -> list[RequestOutput]:
        """End every unfinished choice of a user request with `status`; their final outputs."""
        ids = self.output_processor.unfinished_ids(group_id)
        self.scheduler.finish_requests(ids, status)
        return self.output_processor.end(ids, FINISH_REASONS[status])

    def check_integrity(self) -> None:
        """Assert the engine's invariants between steps: the scheduler's and its blocks' and
        prefix cache's, and that the output processor's unfinished choices are exactly the
        scheduler's requests."""
        self.scheduler.check_integrity()
        self.output_processor.check_integrity(self.scheduler.requests)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do with one rank); idempotent. The engine
        must not be stepped afterwards."""
        if self.workers is not None:
            self.workers.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting,
                           self.scheduler.kv_cache_usage)
