"""POST /v1/completions: one prompt or a list of them (strings or token ids), n choices each.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.prompts import encode_prompt
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import sse
from tokenmill.server.errors import not_supported
from tokenmill.server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs,
                                       CompletionRequest, CompletionResponse)
from tokenmill.server.serving import OpenAIServing, UsageTally, clean_logprob, new_id
from tokenmill.server.streams import ClientDisconnected

log = logging.getLogger(__name__)


class CompletionServing(OpenAIServing):
    endpoint = "completions"

    async def create(self, req: CompletionRequest, raw: Request):
        self.check_request(req)
        self._check_supported(req)
        # Off the event loop: a long prompt must not stall other streams.
        prompts, echo, params = await asyncio.to_thread(self.prepare, req)
        request_id = new_id("cmpl")
        ticket = self.state.admit()
        timing = {"start": time.monotonic()}
        if req.stream:
            body = self._stream(req, prompts, echo, params, request_id, raw, timing)
            return sse.EventStreamResponse(body, on_close=ticket.release)
        try:
            return await self._full(req, prompts, echo, params, request_id, raw, timing)
        finally:
            ticket.release()

    def _check_supported(self, req: CompletionRequest) -> None:
        if req.suffix:
            raise not_supported("suffix", "suffix (fill-in-the-middle)")
        if req.best_of is not None and req.best_of != req.n:
            raise not_supported("best_of", "best_of other than n")
        if req.echo and req.logprobs is not None:
            raise not_supported("echo", "echo together with logprobs (prompt logprobs)")

    def prepare(self, req: CompletionRequest) -> tuple[list[list[int]], list[str],
                                                       SamplingParams]:
        """Token ids of each prompt, checked; the text `echo` puts before its choices (the
        client's own string, or the decoded ids of a token-id prompt; "" without echo); and one
        SamplingParams for all prompts, where the longest one decides what fits."""
        p = req.prompt
        texts = None
        if isinstance(p, str) or isinstance(p[0], str):
            texts = [p] if isinstance(p, str) else list(p)
            prompts = [encode_prompt(self.tokenizer, text) for text in texts]
        else:
            prompts = [list(p)] if isinstance(p[0], int) else [list(ids) for ids in p]
        params = self.sampling_params(req, max(len(ids) for ids in prompts), "prompt")
        self.check_prompts(prompts, params, "prompt")
        if not req.echo:
            return prompts, [""] * len(prompts), params
        if texts is None:  # ids are in the vocabulary by now
            texts = [self.tokenizer.decode(ids) for ids in prompts]
        return prompts, texts, params

    def _logprobs(self, entries: list[TokenLogprobs], k: int, offset: int) -> CompletionLogprobs:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for e in entries:
            text = self.token_text(e.token_id)
            tokens.append(text)
            token_logprobs.append(clean_logprob(e.logprob))
            top.append({self.token_text(i): clean_logprob(lp) for i, lp in e.top[:k]})
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                  text_offset=offsets)

    async def _full(self, req, prompts, echo, params, request_id, raw, timing) -> JSONResponse:
        n = params.n
        total = len(prompts) * n
        texts = [echo[i // n] for i in range(total)]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        tally = UsageTally()
        try:
            async for p, out in self.generate(prompts, params, request_id, raw):
                self.observe(out, timing, time.monotonic())
                tally.add(out)
                i = p * n + out.index
                texts[i] += out.text
                logprobs[i].extend(out.logprobs)
                if out.finished:
                    finish[i] = self.finish_reason(out)
        except ClientDisconnected:
            self.done("disconnected", timing)
            log.info("%s: client disconnected, aborted", request_id)
            return JSONResponse({}, status_code=499)
        except BaseException:
            self.done("error", timing)
            raise
        self.done("ok", timing)
        k = req.logprobs or 0
        choices = [CompletionChoice(
            index=i, text=texts[i], finish_reason=finish[i],
            logprobs=self._logprobs(logprobs[i], k, 0) if req.logprobs is not None else None)
            for i in range(total)]
        body = CompletionResponse(id=request_id, model=self.settings.model_id, choices=choices,
                                  usage=tally.usage(self.settings.price),
                                  system_fingerprint=self.settings.fingerprint)
        return JSONResponse(body.model_dump(mode="json"))

    async def _stream(self, req, prompts, echo, params, request_id, raw,
                      timing) -> AsyncIterator[bytes]:
        created = int(time.time())
        include_usage = req.include_usage
        n = params.n
        k = req.logprobs or 0
        offsets = [0] * (len(prompts) * n)
        pending_echo = [echo[i // n] for i in range(len(prompts) * n)]
        tally = UsageTally()

        def chunk(choices: list[CompletionChoice], usage=None) -> bytes:
            body = CompletionChunk(id=request_id, created=created, model=self.settings.model_id,
                                   system_fingerprint=self.settings.fingerprint, choices=choices,
                                   usage=usage)
            return sse.event(body, exclude=None if include_usage else {"usage"})

        outcome = "error"
        try:
            async for p, out in self.generate(prompts, params, request_id, raw):
                self.observe(out, timing, time.monotonic())
                tally.add(out)
                i = p * n + out.index
                text = pending_echo[i] + out.text
                pending_echo[i] = ""
                if text or out.logprobs:
                    lp = self._logprobs(out.logprobs, k, offsets[i]) if req.logprobs is not None \
                        else None
                    offsets[i] += len(text)
                    yield chunk([CompletionChoice(index=i, text=text, logprobs=lp,
                                                  finish_reason=None)])
                if out.finished:
                    reason = self.finish_reason(out)
                    yield chunk([CompletionChoice(index=i, text="", logprobs=None,
                                                  finish_reason=reason)])
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
