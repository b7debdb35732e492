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
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import EngineStats, LLMEngine
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step thread failed; requests in flight are ended with this error."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class AsyncLLM:
    def __init__(self, build_engine: Callable[[], LLMEngine]):
        """Start the step thread, which calls `build_engine` and then serves it; returns once the
        engine is built, or raises what building it raised."""
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._fatal: BaseException | None = None
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
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls(lambda: LLMEngine(config))

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield output deltas of all n choices; aborts the request if the consumer stops early."""
        if self._fatal is not None:
            raise EngineDeadError(f"the engine stopped: {self._fatal}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.check_prompt(prompt_token_ids, params)
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(_Add(request_id, list(prompt_token_ids), params))
        num_finished = 0
        try:
            while num_finished < params.n:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                num_finished += out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if num_finished < params.n:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._fatal is None and not self._stopping

    async def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    # ---- step thread -------------------------------------------------------------------------

    def _run(self, build_engine: Callable[[], LLMEngine], built: Future[None]) -> None:
        try:
            self.engine = build_engine()
        except BaseException as exc:  # handed to the constructor, which raises it
            built.set_exception(exc)
            return
        built.set_result(None)
        try:
            while not self._stopping:
                # Block for work when idle; otherwise drain what arrived during the last step.
                block = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block):
                    return
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
        except BaseException as exc:  # a bug or resource failure: fail every stream, loudly
            log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
            self._fatal = exc
            for loop, outputs in list(self._streams.values()):
                loop.call_soon_threadsafe(outputs.put_nowait, EngineDeadError(str(exc)))

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
        except ValueError as exc:
            self._deliver_to(command.request_id, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver_to(out.request_id, out)

    def _deliver_to(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)
