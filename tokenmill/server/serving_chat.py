"""POST /v1/chat/completions: chat template -> engine -> `chat.completion` or its SSE chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.prompts import render_chat
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import sse
from tokenmill.server.errors import invalid_request, not_supported
from tokenmill.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                       ChatCompletionChunk, ChatCompletionRequest,
                                       ChatCompletionResponse, ChoiceLogprobs, OtherPart,
                                       TokenLogprob, TopLogprob)
from tokenmill.server.serving import OpenAIServing, UsageTally, clean_logprob, new_id
from tokenmill.server.streams import ClientDisconnected

log = logging.getLogger(__name__)


class ChatServing(OpenAIServing):
    endpoint = "chat"

    async def create(self, req: ChatCompletionRequest, raw: Request):
        self.check_request(req)
        self._check_supported(req)
        # Off the event loop: a long prompt must not stall other streams.
        prompt, params = await asyncio.to_thread(self.prepare, req)
        request_id = new_id("chatcmpl")
        ticket = self.state.admit()
        timing = {"start": time.monotonic()}
        if req.stream:
            body = self._stream(req, prompt, params, request_id, raw, timing)
            return sse.EventStreamResponse(body, on_close=ticket.release)
        try:
            return await self._full(req, prompt, params, request_id, raw, timing)
        finally:
            ticket.release()

    def _check_supported(self, req: ChatCompletionRequest) -> None:
        if req.top_logprobs and not req.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", "top_logprobs",
                                  "invalid_value")
        if req.tools:
            raise not_supported("tools", "tools (function calling)")
        if req.tool_choice not in (None, "none", "auto"):
            raise not_supported("tool_choice", "tool_choice")
        for i, message in enumerate(req.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, OtherPart):
                        raise not_supported(f"messages.{i}.content.{j}.type",
                                            f"content part type {part.type!r}")

    def prepare(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        prompt = self.render(req)
        params = self.sampling_params(req, len(prompt), "messages")
        self.check_prompts([prompt], params, "messages")
        return prompt, params

    def render(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            return render_chat(self.tokenizer, messages)
        except Exception as exc:  # the template refused this conversation (jinja raise_exception)
            raise invalid_request(f"The chat template rejected the messages: {exc}", "messages")

    def _logprobs(self, entries: list[TokenLogprobs], k: int) -> ChoiceLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self.token_text(token_id)
            return TopLogprob(token=text, logprob=clean_logprob(logprob),
                              bytes=list(text.encode("utf-8")))

        content = []
        for e in entries:
            t = top(e.token_id, e.logprob)
            content.append(TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                                        top_logprobs=[top(i, lp) for i, lp in e.top[:k]]))
        return ChoiceLogprobs(content=content)

    async def _full(self, req, prompt, params, request_id, raw, timing) -> JSONResponse:
        texts = [""] * params.n
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(params.n)]
        finish: list[str | None] = [None] * params.n
        tally = UsageTally()
        try:
            async for _, out in self.generate([prompt], params, request_id, raw):
                self.observe(out, timing, time.monotonic())
                tally.add(out)
                texts[out.index] += out.text
                logprobs[out.index].extend(out.logprobs)
                if out.finished:
                    finish[out.index] = self.finish_reason(out)
        except ClientDisconnected:
            self.done("disconnected", timing)
            log.info("%s: client disconnected, aborted", request_id)
            return JSONResponse({}, status_code=499)  # nobody reads it
        except BaseException:
            self.done("error", timing)
            raise
        self.done("ok", timing)
        k = req.top_logprobs or 0
        choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]),
                              logprobs=self._logprobs(logprobs[i], k) if req.logprobs else None,
                              finish_reason=finish[i]) for i in range(params.n)]
        body = ChatCompletionResponse(id=request_id, model=self.settings.model_id, choices=choices,
                                      usage=tally.usage(self.settings.price),
                                      system_fingerprint=self.settings.fingerprint)
        return JSONResponse(body.model_dump(mode="json"))

    async def _stream(self, req, prompt, params, request_id, raw,
                      timing) -> AsyncIterator[bytes]:
        created = int(time.time())
        include_usage = req.include_usage
        k = req.top_logprobs or 0
        tally = UsageTally()

        def chunk(choices: list[ChatChunkChoice], usage=None) -> bytes:
            body = ChatCompletionChunk(id=request_id, created=created, model=self.settings.model_id,
                                       system_fingerprint=self.settings.fingerprint,
                                       choices=choices, usage=usage)
            # With include_usage, usage is null on every chunk but the last; else absent.
            return sse.event(body, exclude=None if include_usage else {"usage"})

        outcome = "error"
        try:
            for i in range(params.n):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            async for _, out in self.generate([prompt], params, request_id, raw):
                self.observe(out, timing, time.monotonic())
                tally.add(out)
                if out.text or out.logprobs:
                    lp = self._logprobs(out.logprobs, k) if req.logprobs else None
                    yield chunk([ChatChunkChoice(index=out.index, delta={"content": out.text},
                                                 logprobs=lp)])
                if out.finished:
                    reason = self.finish_reason(out)
                    yield chunk([ChatChunkChoice(index=out.index, delta={}, finish_reason=reason)])
            if include_usage:
                yield chunk([], usage=tally.usage(self.settings.price))
            outcome = "ok"
        except (ClientDisconnected, asyncio.CancelledError, GeneratorExit) as exc:
            outcome = "disconnected"
            log.info("%s: client disconnected, aborted", request_id)
            if not isinstance(exc, ClientDisconnected):
                raise
        finally:
            self.done(outcome, timing)
