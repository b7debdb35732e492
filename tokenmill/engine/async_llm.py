"""AsyncLLM: the asyncio front of the engine.

The LLMEngine is owned by one step thread. The event loop never touches it: `generate` and `abort`
post commands to a thread-safe queue that the step thread drains before every step, and outputs
come back to each request's asyncio.Queue through `loop.call_soon_threadsafe`. So the event loop
stays responsive while a step runs, and the engine needs no locks.

The step thread also builds the engine (loading, packing, KV allocation): it must be the only
thread that runs parallel torch ops. Once a second thread has its own OpenMP team, libgomp counts
more managed threads than cores and throttles the spin-wait of every team, so each of a decode
step's hundreds of small parallel regions wakes its workers through the kernel: measured here,
a step thread whose engine the main thread had built decoded at 11.6 tokens/s, against 26 when it
built the engine itself.

Faults: a step that fails costs the requests it ran (LLMEngine recovers; their streams raise
StepFailedError) and the engine serves on, unless `max_step_failures` steps fail within
`step_failure_window_s`, or anything else on the step thread fails (the scheduler, a recovery):
then the engine is dead: `on_dead` is called once, then every stream, and every later
`generate`, raises EngineDeadError. `shutdown` fails the streams still open the same way, without
`on_dead`. A stream whose event loop has closed is dropped and its request aborted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import EngineStats, LLMEngine
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine stopped (it failed, or was shut down); requests in flight end with this."""


class StepFailedError(RuntimeError):
    """A step that ran this request failed (or the engine could not queue it): the request was
    dropped and the engine serves on. The message says nothing of the engine's internals."""


STEP_FAILED = "the engine failed while running this request"
SHUT_DOWN = "the engine was shut down"


class FailureWindow:
    """Counts failures in a sliding time window: `record` says when `limit` of them happened
    within `window_s` seconds."""

    def __init__(self, limit: int, window_s: float):
        assert limit >= 1 and window_s > 0
        self.limit, self.window_s = limit, window_s
        self._times: deque[float] = deque()  # failures less than window_s old, oldest first

    def record(self, now: float) -> bool:
        """Count a failure at time `now` (non-decreasing); True once `limit` are in the window."""
        self._times.append(now)
        while now - self._times[0] >= self.window_s:
            self._times.popleft()
        return len(self._times) >= self.limit


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


_Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncLLM:
    def __init__(self, build_engine: Callable[[], LLMEngine], max_step_failures: int = 3,
                 step_failure_window_s: float = 60.0,
                 on_dead: Callable[[BaseException], None] | None = None):
        """Start the step thread, which calls `build_engine` and then serves it; returns once the
        engine is built, or raises what building it raised.

        `max_step_failures` failed steps within `step_failure_window_s` seconds declare the engine
        dead. `on_dead(cause)` is then called once, on the step thread, once is_healthy() is False
        and before any stream fails: it must be quick and thread-safe (e.g. it posts to an event
        loop with `loop.call_soon_threadsafe`)."""
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        # Guards registering a stream against closing: a stream is either registered before
        # `_closed` is set, and then failed by `_close`, or refused by `generate`.
        self._lock = threading.Lock()
        self._closed: str | None = None  # why no request is taken any more; None while serving
        self._failures = FailureWindow(max_step_failures, step_failure_window_s)
        self._on_dead = on_dead
        self._stopping = False
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(build_engine, built),
                                        name="tokenmill-step", daemon=True)
        self._thread.start()
        built.result()  # waits; raises what building raised
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len

    @classmethod
    def from_config(cls, config: EngineConfig, **options) -> AsyncLLM:
        """`options`: the constructor's (max_step_failures, step_failure_window_s, on_dead)."""
        return cls(lambda: LLMEngine(config), **options)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield output deltas of all n choices; aborts the request if the consumer stops early.
        Raises GrammarError if params.structured does not compile, StepFailedError if a step
        running it fails, EngineDeadError if the engine stops."""
        self.engine.check_prompt(prompt_token_ids, params)
        if params.structured is not None:  # raises GrammarError; cached for add_request
            await asyncio.to_thread(self.engine.grammars.compile, params.structured)
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        stream = (asyncio.get_running_loop(), outputs)
        with self._lock:
            if self._closed is not None:
                raise EngineDeadError(self._closed)
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        self._commands.put(_Add(request_id, list(prompt_token_ids), params))
        num_finished = 0
        try:
            while num_finished < params.n:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finish_reason == "error":  # the whole request failed with that step
                    raise StepFailedError(STEP_FAILED)
                num_finished += out.finished
                yield out
        finally:
            self._unregister(request_id, stream)
            if num_finished < params.n:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._closed is None

    async def shutdown(self) -> None:
        """Stop the step thread; streams still open raise EngineDeadError."""
        self._close(SHUT_DOWN)
        self._stopping = True
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    def _unregister(self, request_id: str, stream: _Stream) -> bool:
        """Remove this stream (not a later one of the same id); False if it was gone already."""
        with self._lock:
            if self._streams.get(request_id) is not stream:
                return False
            del self._streams[request_id]
            return True

    def _close(self, reason: str, cause: BaseException | None = None) -> None:
        """Take no more requests and fail every open stream with EngineDeadError(reason); the
        first call wins. If the engine died of `cause`, `on_dead(cause)` runs in between: once
        it runs is_healthy() is False, and a stream fails only after it has returned."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = reason
            streams = list(self._streams.values())
        if cause is not None and self._on_dead is not None:
            try:
                self._on_dead(cause)
            except Exception:
                log.exception("on_dead failed")
        for loop, outputs in streams:
            _send(loop, outputs, EngineDeadError(reason))

    # ---- step thread -------------------------------------------------------------------------

    def _run(self, build_engine: Callable[[], LLMEngine], built: Future[None]) -> None:
        try:
            self.engine = build_engine()
        except BaseException as exc:  # handed to the constructor, which raises it
            built.set_exception(exc)
            return
        built.set_result(None)
        try:
            self._serve()
        except BaseException as exc:  # a bug or resource failure: fail every stream, loudly
            log.exception("the engine is dead; failing %d in-flight requests", len(self._streams))
            self._close(f"the engine stopped: {exc}", exc)
        finally:
            self.engine.shutdown()  # its tensor-parallel workers, if any

    def _serve(self) -> None:
        """Step until shutdown; raises once the engine must be declared dead."""
        while not self._stopping:
            # Block for work when idle; otherwise drain what arrived during the last step.
            block = not self.engine.has_unfinished_requests()
            if not self._apply_commands(block):
                return
            if self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                self._deliver(outputs)
                failed = any(out.finish_reason == "error" for out in outputs)
                if failed and self._failures.record(time.monotonic()):
                    raise EngineDeadError(f"{self._failures.limit} steps failed within "
                                          f"{self._failures.window_s:g} s")

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts; False once shutdown was asked."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            elif command.request_id not in self._streams:  # nobody listens any more
                self.engine.abort(command.request_id)
            else:
                self._deliver(self.engine.abort(command.request_id))
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, command: _Add) -> None:
        if command.request_id not in self._streams:  # the client left before it was queued
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except ValueError as exc:  # a request the engine refuses
            self._deliver_to(command.request_id, exc)
        except Exception:  # add_request is all or nothing: the engine is intact
            log.exception("queueing request %s failed", command.request_id)
            self._deliver_to(command.request_id, StepFailedError(STEP_FAILED))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver_to(out.request_id, out)

    def _deliver_to(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Hand `item` to the request's stream; a stream whose event loop has closed is dropped
        and its request aborted, since nobody will read it again."""
        stream = self._streams.get(request_id)
        if stream is None or _send(*stream, item):
            return
        if self._unregister(request_id, stream):
            log.warning("request %s: its event loop closed; aborting it", request_id)
            self.engine.abort(request_id)


def _send(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, item) -> bool:
    """Put `item` on a stream's queue from any thread; False if its event loop has closed."""
    try:
        loop.call_soon_threadsafe(outputs.put_nowait, item)
    except RuntimeError:  # "Event loop is closed"
        return False
    return True
