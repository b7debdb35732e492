"""What chat and text completions share: the request's life from checks to the last byte.

`OpenAIServing.create` checks a request, prepares a `Job` off the event loop, admits it, runs it in
the engine under the hang-up/deadline guard and answers with one JSON body or an SSE stream. The
endpoints supply only what differs: their own checks, how a request becomes prompts (`prepare`),
and the response classes their choices and chunks are made of.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request

from tokenmill.engine.llm_engine import PromptError
from tokenmill.engine.outputs import RequestOutput, TokenLogprobs
from tokenmill.engine.structured import GrammarError
from tokenmill.sampling_params import SamplingParams, StructuredOutputs
from tokenmill.server import sse
from tokenmill.server.errors import (APIError, SERVER_ERROR, context_length_exceeded,
                                     invalid_request, permission_denied)
from tokenmill.server.metering import Metering
from tokenmill.server.metrics import Metrics
from tokenmill.server.models import ServedModel, ServedModels
from tokenmill.server.protocol import Usage
from tokenmill.server.state import Demand, ServerSettings, ServerState
from tokenmill.server.streams import ClientDisconnected, guarded, merge, within
from tokenmill.server.structured import requested_constraint
from tokenmill.server.tool_formats import ToolFormat
from tokenmill.server.usage import UsageTally

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf
# Admission bounds a chat prompt's tokens before rendering it: the template's own tokens (a
# default system message, headers) are at most this much, plus this much per message.
TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE = 64, 16


def utf8_bytes(text: str, param: str) -> int:
    """The UTF-8 length of `text`: a bound of its tokens under any byte-level tokenizer. Text
    that is not valid Unicode (a lone surrogate from a JSON escape) is a 400 naming `param`: no
    tokenizer can encode it."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise invalid_request(f"'{param}' is not valid Unicode: {exc.reason} at position "
                              f"{exc.start}.", param, "invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Job:
    """A checked request, ready for the engine. Choice `c = p * n + i` is choice `i` of prompt
    `p` (OpenAI's numbering for a list of prompts); chat has one prompt."""

    model: ServedModel  # the model (engine, price, template) the request is routed to
    prompts: list[list[int]]  # token ids of each prompt
    params: SamplingParams  # one for all prompts: the longest decided what fits
    echo: list[str]  # per prompt, the text its choices start with (the echoed prompt, or "")
    tool_format: ToolFormat | None = None  # chat: the format its choices' calls are parsed in

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    def choice(self, prompt_no: int, index: int) -> int:
        return prompt_no * self.params.n + index

    def opening_text(self) -> list[str]:
        """Per choice, the text it starts with."""
        return [self.echo[c // self.params.n] for c in range(self.num_choices)]


class ChoiceStream:
    """One streamed choice's text -> the choices its chunks carry. This one passes the text
    through (completions, chat without tools); chat's tool calls reshape it (serving_chat.py)."""

    def __init__(self, serving: OpenAIServing, index: int):
        self.serving = serving
        self.index = index

    def text(self, text: str, logprobs: BaseModel | None) -> list:
        return [self.serving.delta_choice(self.index, text, logprobs, None)]

    def finish(self, finish_reason: str) -> list:
        return [self.serving.delta_choice(self.index, None, None, finish_reason)]


class OpenAIServing(ABC):
    """One endpoint's serving. Subclasses set `endpoint` (the metrics label) and `id_prefix`, and
    implement the hooks below `create`'s helpers: `check_supported`, `prepare`, `logprobs`,
    `choice`, `response`, `opening_choices`, `delta_choice` and `chunk`."""

    endpoint: str
    id_prefix: str

    def __init__(self, models: ServedModels, settings: ServerSettings, state: ServerState,
                 metrics: Metrics):
        self.models = models
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.metering = Metering(settings, state)

    # ---- validation -----------------------------------------------------------------------

    def check_request(self, req) -> ServedModel:
        """Checks shared by both endpoints that pydantic cannot name a parameter for; returns the
        model the request is routed to (a 404 naming the served ids if there is none)."""
        model = self.models.get(req.model)
        if req.stream_options is not None and not req.stream:
            raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' "
                                  "is enabled.", "stream_options", "invalid_value")
        requested_constraint(req)  # a malformed or doubled constraint is a 400 before queueing
        return model

    def constraint(self, model: ServedModel, req) -> StructuredOutputs | None:
        """The request's output constraint, compiled: call it off the event loop, a large
        schema takes up to a second."""
        structured, param = requested_constraint(req)
        return None if structured is None else compiled(model, structured, param)

    @staticmethod
    def check_token_ids(model: ServedModel, ids, param: str) -> None:
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise invalid_request(f"token id {bad[0]} is out of vocabulary "
                                  f"(vocab_size {model.vocab_size})", param, "invalid_value")

    @staticmethod
    def check_prompts(model: ServedModel, prompts: list[list[int]], params: SamplingParams,
                      prompt_param: str) -> None:
        """The engine's own prompt check, run before the response starts (a stream cannot turn
        into a 400 later); `prompt_param` is what the 400 names."""
        for ids in prompts:
            try:
                model.engine.engine.check_prompt(ids, params)  # LLMEngine's: pure, thread-safe
            except PromptError as exc:
                raise invalid_request(str(exc), prompt_param, "invalid_value") from None

    def sampling_params(self, model: ServedModel, req, prompt_len: int,
                        prompt_param: str) -> SamplingParams:
        """Build SamplingParams, refusing (never truncating) what does not fit the context."""
        max_len = model.max_model_len
        room = max_len - prompt_len
        if room < 1:
            raise context_length_exceeded(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"{prompt_param} resulted in {prompt_len} tokens. Please reduce the length of the "
                f"{prompt_param}.", prompt_param)
        asked = req.requested_max_tokens
        if asked is None:
            max_tokens = min(max(self.settings.default_max_tokens, req.min_tokens), room)
        elif asked > room:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) \
                else "max_tokens"
            raise context_length_exceeded(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the {prompt_param}, {asked} in the "
                f"completion). Please reduce the length of the {prompt_param} or completion.",
                param)
        else:
            max_tokens = asked
        logit_bias = req.logit_bias or {}  # token id -> bias, keys converted by protocol
        self.check_token_ids(model, logit_bias, "logit_bias")
        stop_token_ids = tuple(req.stop_token_ids or ())
        self.check_token_ids(model, stop_token_ids, "stop_token_ids")
        # SamplingParamsError propagates to its handler: a 400 naming the parameter.
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=logit_bias,
            seed=req.seed,
            logprobs=req.num_logprobs,
            stop=req.stop or (),  # a string or a list: SamplingParams makes it a tuple
            stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos,
            structured=self.constraint(model, req),
        )

    # ---- one request, from checks to the last byte ---------------------------------------------

    async def create(self, req, raw: Request):
        timing = {"start": time.monotonic(), "arrival": datetime.now(timezone.utc)}
        model = self.check_request(req)
        principal = getattr(raw.state, "principal", None)
        if principal is not None and principal.models is not None \
                and model.id not in principal.models:
            raise permission_denied(f"This API key may not use the model `{model.id}`.", "model")
        self.check_supported(req)
        # Admitted by what it will hold before any tokenizing: shedding load costs nothing.
        ticket = self.state.admit(self.demand(model, req), principal and principal.key_id)
        try:
            # Off the event loop: tokenizing a long prompt must not stall other streams. The
            # deadline runs from arrival, so it covers this too.
            job = await within(asyncio.to_thread(self.prepare, model, req),
                               self.remaining(timing), self.settings.request_timeout_s)
            request_id = new_id(self.id_prefix)
            headers = await self.metering.reserve(job, raw)
        except BaseException:
            ticket.release()
            raise
        if req.stream:
            body = self._stream(req, job, request_id, raw, timing)

            async def closed() -> None:
                ticket.release()
                await self.metering.release_unbilled(raw)

            response = sse.EventStreamResponse(body, on_close=closed)
            response.headers.update(headers)
            return response
        try:
            response = await self._full(req, job, request_id, raw, timing)
            response.headers.update(headers)
            return response
        finally:
            ticket.release()

    async def _full(self, req, job: Job, request_id: str, raw: Request,
                    timing: dict) -> JSONResponse:
        texts = job.opening_text()
        entries: list[list[TokenLogprobs]] = [[] for _ in range(job.num_choices)]
        finish: list[str | None] = [None] * job.num_choices
        tally = UsageTally()
        try:
            async for p, out in self.generate(job, request_id, raw, timing):
                self.observe(job.model.id, out, timing, time.monotonic())
                tally.add(out)
                c = job.choice(p, out.index)
                texts[c] += out.text
                entries[c].extend(out.logprobs)
                if out.finished:
                    finish[c] = self.finish_reason(out)
        except ClientDisconnected:
            self.done("disconnected", timing)
            log.info("%s: client disconnected, aborted", request_id)
            await self.metering.bill_quietly(job, request_id, raw, tally, "aborted", None, timing)
            return JSONResponse({}, status_code=499)  # nobody reads it
        except BaseException:
            self.done("error", timing)
            await self.metering.bill_quietly(job, request_id, raw, tally, "error", None, timing)
            raise
        self.done("ok", timing)
        k = req.num_logprobs
        choices = [self.full_choice(job, c, texts[c],
                                    None if k is None else self.logprobs(job, entries[c], k, 0),
                                    finish[c]) for c in range(job.num_choices)]
        body = self.response(job, request_id, choices, tally.usage(job.model.entry.price))
        # Durable before the body leaves: a response the client got is always in the ledger.
        await self.metering.bill(job, request_id, raw, tally, "completed", finish[-1], timing)
        return JSONResponse(body.model_dump(mode="json"))

    async def _stream(self, req, job: Job, request_id: str, raw: Request,
                      timing: dict) -> AsyncIterator[bytes]:
        created = int(time.time())
        k = req.num_logprobs
        # With include_usage, usage is null on every chunk but the last; else it is absent.
        exclude = None if req.include_usage else {"usage"}
        pending = job.opening_text()  # sent with each choice's first text
        offsets = [0] * job.num_choices  # characters of each choice sent so far
        streams = [self.choice_stream(job, c) for c in range(job.num_choices)]
        tally = UsageTally()

        def event(choices: list, usage: Usage | None = None) -> bytes:
            return sse.event(self.chunk(job, request_id, created, choices, usage),
                             exclude=exclude)

        outcome, billed, last_finish = "error", False, None
        try:
            for opening in self.opening_choices(job.num_choices):
                yield event([opening])
            async for p, out in self.generate(job, request_id, raw, timing):
                self.observe(job.model.id, out, timing, time.monotonic())
                tally.add(out)
                c = job.choice(p, out.index)
                text, pending[c] = pending[c] + out.text, ""
                if text or out.logprobs:
                    lp = None if k is None else self.logprobs(job, out.logprobs, k, offsets[c])
                    offsets[c] += len(text)
                    for choice in streams[c].text(text, lp):
                        yield event([choice])
                if out.finished:
                    last_finish = self.finish_reason(out)
                    for choice in streams[c].finish(last_finish):
                        yield event([choice])
            if req.include_usage:
                yield event([], usage=tally.usage(job.model.entry.price))
            # Durable before `[DONE]` (sent after this generator ends) goes out.
            billed = True
            await self.metering.bill(job, request_id, raw, tally, "completed", last_finish, timing)
            outcome = "ok"
        except (ClientDisconnected, asyncio.CancelledError, GeneratorExit) as exc:
            outcome = "disconnected"
            log.info("%s: client disconnected, aborted", request_id)
            if not billed:  # the tokens produced are billed, the client gone or not
                billed = True
                await self.metering.bill_quietly(job, request_id, raw, tally, "aborted", None,
                                                 timing)
            if not isinstance(exc, ClientDisconnected):
                raise
        finally:
            self.done(outcome, timing)
            if not billed:
                await self.metering.bill_quietly(job, request_id, raw, tally, "error", None, timing)

    def max_tokens_bound(self, model: ServedModel, req) -> int:
        """The most tokens one sequence of `req` may generate: never more than the context
        (`sampling_params` refuses more with a 400 naming the parameter, once the prompt is
        known; admission must not turn that into a 429)."""
        asked = req.requested_max_tokens
        wanted = max(self.settings.default_max_tokens, req.min_tokens) if asked is None else asked
        return min(wanted, model.max_model_len)

    def remaining(self, timing: dict) -> float:
        """Seconds left of the request's deadline, which runs from its arrival."""
        return timing["start"] + self.settings.request_timeout_s - time.monotonic()

    # ---- what each endpoint supplies ----------------------------------------------------------

    @abstractmethod
    def demand(self, model: ServedModel, req) -> Demand:
        """What the request will hold in flight (sequences, a bound of their tokens), from the
        body alone: no tokenizing, no template."""

    @abstractmethod
    def check_supported(self, req) -> None:
        """400 for what this endpoint accepts in its schema but does not serve yet."""

    @abstractmethod
    def prepare(self, model: ServedModel, req) -> Job:
        """Prompts and SamplingParams for `model`, all checks done (runs in a worker thread)."""

    @abstractmethod
    def logprobs(self, job: Job, entries: list[TokenLogprobs], k: int,
                 offset: int) -> BaseModel:
        """The logprobs object of `entries`, with `k` top alternatives; `offset` is the character
        position of the first entry's text in its choice."""

    @abstractmethod
    def choice(self, index: int, text: str, logprobs: BaseModel | None,
               finish_reason: str | None) -> BaseModel:
        """One finished choice of a full response."""

    def full_choice(self, job: Job, index: int, text: str, logprobs: BaseModel | None,
                    finish_reason: str | None) -> BaseModel:
        """One finished choice of `job`'s full response (chat parses tool calls here)."""
        return self.choice(index, text, logprobs, finish_reason)

    def choice_stream(self, job: Job, index: int) -> ChoiceStream:
        """The per-choice shaper of a stream's text into its chunks' choices."""
        return ChoiceStream(self, index)

    @abstractmethod
    def response(self, job: Job, request_id: str, choices: list, usage: Usage) -> BaseModel:
        """The whole non-streamed response."""

    def opening_choices(self, num_choices: int) -> list:
        """Choices sent, one a chunk, before any text (chat's role deltas)."""
        return []

    @abstractmethod
    def delta_choice(self, index: int, text: str | None, logprobs: BaseModel | None,
                     finish_reason: str | None) -> BaseModel:
        """A streamed choice: new `text`, or the finish (`text` None, `finish_reason` set)."""

    @abstractmethod
    def chunk(self, job: Job, request_id: str, created: int, choices: list,
              usage: Usage | None) -> BaseModel:
        """One streamed chunk holding `choices` (none, with the final usage)."""

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, job: Job, request_id: str, raw: Request,
                 timing: dict) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt number, output) for every output of every prompt of the job, from its model's
        engine (engine ids `request_id`, or `request_id-<p>` for several prompts), guarded against
        hang-ups and the deadline."""
        prompts, engine = job.prompts, job.model.engine
        ids = [request_id] if len(prompts) == 1 else \
            [f"{request_id}-{p}" for p in range(len(prompts))]
        gens = [_tagged(p, engine.generate(prompts[p], job.params, ids[p]))
                for p in range(len(prompts))]
        return guarded(merge(gens), raw, self.remaining(timing), self.settings.request_timeout_s)

    def observe(self, model_id: str, out: RequestOutput, timing: dict, now: float) -> None:
        """Feed metrics: TTFT on the request's first token, ITL between a choice's outputs, and
        `model_id`'s token counters."""
        key = (out.request_id, out.index)
        if out.new_token_ids:
            last = timing.get(key)
            if "first" not in timing:
                timing["first"] = now
                self.metrics.ttft.observe(now - timing["start"])
            elif last is not None:
                self.metrics.itl.observe(now - last)
            timing[key] = now
            self.metrics.generation_tokens.labels(model_id).inc(len(out.new_token_ids))
        if out.finished and out.index == 0:
            self.metrics.prompt_tokens.labels(model_id).inc(out.num_prompt_tokens)
            self.metrics.cached_tokens.labels(model_id).inc(out.num_cached_tokens)

    def finish_reason(self, out: RequestOutput) -> str:
        if out.finish_reason == "abort":
            # Only the server aborts a request whose client is still listening (shutdown).
            raise APIError(503, "The request was aborted by the server.", SERVER_ERROR, None,
                           "aborted")
        return out.finish_reason

    def done(self, outcome: str, timing: dict) -> None:
        self.metrics.requests.labels(self.endpoint, outcome).inc()
        if outcome == "ok":
            self.metrics.e2e.observe(time.monotonic() - timing["start"])


async def _tagged(tag: int, outputs: AsyncIterator[RequestOutput]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    try:
        async for out in outputs:
            yield tag, out
    finally:
        await outputs.aclose()  # aborts the engine request if it is still running


def compiled(model: ServedModel, structured: StructuredOutputs,
             param: str) -> StructuredOutputs:
    """`structured`, once the model's engine has compiled it (and cached it, so the engine's own
    compile is a lookup); a constraint that does not compile is a 400 naming `param`."""
    try:
        model.engine.engine.grammars.compile(structured)
    except GrammarError as exc:
        raise invalid_request(f"Invalid '{param}': {exc}", param, "invalid_value") from None
    return structured


def clean_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isinf(value) or math.isnan(value) else float(value)
