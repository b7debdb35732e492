"""Scheduler: decides each step which requests run and how many tokens each one computes.

    add_request -> waiting -> schedule() -> SchedulerOutput -> (runner) -> update_from_output()
    -> requests that got a token (finished ones already freed and forgotten)

It owns the BlockManager and is, with it, the only writer of a Request's engine state.

NOTE on the algorithm (after vLLM's NOTE(woosuk)): there is no prefill phase and no decode phase.
A request has `num_computed_tokens` and `num_tokens`, and each step gives every scheduled request
`num_new_tokens = min(num_tokens - num_computed_tokens, token budget left)`. A decode is the case
where that is 1, a prefill chunk any other; a prefix hit just starts `num_computed_tokens` higher.

Policies:
- Running requests go first, in arrival order. When one needs a block and none is left, the most
  recently arrived running request is preempted (recompute: its blocks are freed, it restarts
  from zero at the front of the waiting queue and recomputes prompt + output, often from the
  prefix cache), possibly itself. A step that preempted admits nobody: the blocks just freed go
  to the running requests, not back to the victim.
- Waiting requests are admitted strictly FCFS: if the head does not fit (blocks, token budget or
  max_num_seqs) admission stops, so a later small request never overtakes an earlier large one
  and nothing starves. Prompts larger than the budget left are prefilled in chunks, mixed with the
  decodes of running requests.
- The one exception: an n > 1 choice whose `prefix_source` sibling has not computed its prompt
  yet is skipped (it keeps its place) so that it later hits the sibling's prompt blocks instead of
  recomputing them; the requests behind it are not held up.
- Under a sliding window, `BlockManager.allocate` releases each request's blocks that fell out
  of the window before it makes room for the step: a request holds its window, not its history.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from collections.abc import Iterable

from tokenmill.config import CacheConfig, SchedulerConfig, window_span_blocks
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.stop import check_stop

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 eos_token_ids: tuple[int, ...] = ()):
        self.config = scheduler_config
        self.block_manager = BlockManager(cache_config.num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching,
                                          cache_config.sliding_window)
        self.eos_token_ids = frozenset(eos_token_ids)
        # A request never outgrows the whole KV cache, whatever max_model_len says: past it, a
        # lone request would preempt itself forever. Under a sliding window it holds only its
        # window's and one chunk's blocks: when those fit, any length does.
        window = cache_config.sliding_window
        capacity = cache_config.num_blocks * cache_config.block_size
        if window is not None and cache_config.num_blocks >= window_span_blocks(
                window, scheduler_config.max_num_batched_tokens, cache_config.block_size):
            capacity = scheduler_config.max_model_len
        self.max_model_len = min(scheduler_config.max_model_len, capacity)
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests re-enter at the front
        self.running: list[Request] = []  # holding blocks, in arrival order: last preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self._arrival: dict[str, int] = {}  # request id -> rank in arrival order
        self._arrivals = itertools.count()  # the next rank

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if it could never run (the server validates first)."""
        num_prompt = request.num_prompt_tokens
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.config.max_model_len:
            raise ValueError(f"a prompt of {num_prompt} tokens leaves no room for output within "
                             f"max_model_len={self.config.max_model_len}")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"a prompt of {num_prompt} tokens leaves no room for output in the "
                             f"KV cache of {self.max_model_len} tokens")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._arrival[request.request_id] = next(self._arrivals)
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled, preempted = self._schedule_running(budget)
        if not preempted:
            scheduled += self._admit_waiting(budget - sum(s.num_new_tokens for s in scheduled))
        # Batch order, a contract with the runner: rows of one new token (decodes) first, then
        # the longer chunks; arrival order within each group (the sort is stable).
        scheduled.sort(key=lambda s: s.num_new_tokens > 1)
        return SchedulerOutput(scheduled, sum(s.num_new_tokens for s in scheduled), preempted)

    def update_from_output(self, sched_out: SchedulerOutput,
                           runner_out: RunnerOutput) -> list[Request]:
        """Advance the scheduled requests; returns those that got a token, finished ones included.

        Finished requests are freed and forgotten before this returns.
        """
        sampled = dict(zip(runner_out.request_ids, runner_out.sampled_token_ids))
        updated, finished = [], []
        for scheduled in sched_out.scheduled:
            request = scheduled.request
            if request.status != RequestStatus.RUNNING:  # finished since schedule()
                continue
            self.block_manager.cache_computed(request, scheduled.num_new_tokens)
            request.num_computed_tokens += scheduled.num_new_tokens
            if (token_id := sampled.get(request.request_id)) is None:
                continue  # a prefill chunk short of the prompt's end: nothing sampled
            request.output_token_ids.append(token_id)
            if request.grammar is not None and not request.grammar.accept(token_id):
                log.warning("request %s: its grammar refused token %d: %s", request.request_id,
                            token_id, request.grammar.error)
            if (status := check_stop(request, self.eos_token_ids, self.max_model_len)) is not None:
                request.status = status
                # A stopping token (EOS, a stop id) is kept out of the text; the last token of a
                # grammar that is complete is part of it.
                by_token = token_id in self.eos_token_ids or \
                    token_id in request.sampling_params.stop_token_ids
                request.stop_reason = token_id if status == RequestStatus.FINISHED_STOPPED \
                    and by_token else None
                finished.append(request)
            updated.append(request)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
            for request in finished:
                self._forget(request)
        return updated

    def finish_requests(self, request_ids: Iterable[str] | str, status: RequestStatus) -> None:
        """End requests from outside (abort, stop string), whatever their state; frees all."""
        assert status.is_finished
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            if (request := self.requests.get(request_id)) is None:
                continue  # unknown or already finished
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._forget(request)

    def check_integrity(self) -> None:
        """Assert the block manager's invariants and the queues': every unfinished request is
        in exactly one queue, running ones (in arrival order) alone hold blocks."""
        self.block_manager.check_integrity()
        assert all(r.status == RequestStatus.RUNNING for r in self.running)
        assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
                   for r in self.waiting)
        queued = [*self.running, *self.waiting]
        assert {r.request_id: r for r in queued} == self.requests
        assert len(queued) == len(self.requests) and self._arrival.keys() == self.requests.keys()
        ranks = [self._arrival[r.request_id] for r in self.running]
        assert ranks == sorted(ranks)
        assert self.block_manager.holders == {r.request_id: r for r in self.running}

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledRequest], list[Request]]:
        """Give running requests their tokens, preempting from the newest when blocks run out."""
        scheduled, preempted = [], []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new):
                victim = self.running.pop()  # the newest; never one scheduled this step
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                i += 1
        return scheduled, preempted

    def _admit_waiting(self, budget: int) -> list[ScheduledRequest]:
        """Admit waiting requests FCFS while the head fits; see the module docstring."""
        scheduled, deferred = [], []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._waits_for_prefix_source(request):
                deferred.append(self.waiting.popleft())
                continue
            if (num_new := self._admit(request, budget)) is None:
                break
            self.waiting.popleft()
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))
        return scheduled

    def _admit(self, request: Request, budget: int) -> int | None:
        """Take the prefix hit and blocks for the request's first chunk; its size, or None."""
        hits = self.block_manager.match_prefix(request)
        num_computed = len(hits) * self.block_manager.block_size
        num_new = min(request.num_tokens - num_computed, budget)
        if not self.block_manager.allocate(request, num_new, hits):
            return None
        request.num_computed_tokens = num_computed
        if request.num_cached_tokens < 0:  # first scheduling: what the prompt got from the cache
            request.num_cached_tokens = num_computed
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=lambda r: self._arrival[r.request_id])
        return num_new

    def _waits_for_prefix_source(self, request: Request) -> bool:
        """True while a sibling this request should share prompt blocks with is still on it."""
        source = request.prefix_source
        return (self.block_manager.enable_prefix_caching and source is not None
                and source.request_id in self.requests
                and source.num_computed_tokens < source.num_prompt_tokens)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _forget(self, request: Request) -> None:
        self.block_manager.free(request)
        del self.requests[request.request_id]
        del self._arrival[request.request_id]
