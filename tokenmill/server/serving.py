"""What chat and text completions share: model check, request -> SamplingParams with the context
length check, the engine call with hang-up/deadline guard, usage and cost, logprob text.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from tokenmill.engine.llm_engine import PromptError
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import (APIError, SERVER_ERROR, context_length_exceeded,
                                     invalid_request, model_not_found, not_supported)
from tokenmill.server.metrics import Metrics
from tokenmill.server.protocol import PromptTokensDetails, Usage
from tokenmill.server.state import ServerSettings, ServerState
from tokenmill.server.streams import guarded, merge

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class UsageTally:
    """Token counts of one HTTP request (several engine requests for a list of prompts)."""

    prompt: dict[str, int] = field(default_factory=dict)  # engine request id -> prompt tokens
    cached: dict[str, int] = field(default_factory=dict)  # engine request id -> cached tokens
    output: dict[tuple[str, int], int] = field(default_factory=dict)  # (id, index) -> generated

    def add(self, out: RequestOutput) -> None:
        self.prompt[out.request_id] = out.num_prompt_tokens
        self.cached[out.request_id] = max(out.num_cached_tokens, 0)
        self.output[(out.request_id, out.index)] = out.num_output_tokens

    def usage(self, price) -> Usage:
        prompt, completion = sum(self.prompt.values()), sum(self.output.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached.values())),
                     estimated_cost=round(price.cost(prompt, completion), 12))


class OpenAIServing:
    endpoint = "?"

    def __init__(self, engine, settings: ServerSettings, state: ServerState, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        self._token_text: dict[int, str] = {}

    # ---- validation -----------------------------------------------------------------------

    def check_request(self, req) -> None:
        """Checks shared by both endpoints that pydantic cannot name a parameter for."""
        if req.model != self.settings.model_id:
            raise model_not_found(req.model)
        if req.stream_options is not None and not req.stream:
            raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' "
                                  "is enabled.", "stream_options", "invalid_value")
        self.check_response_format(req.response_format)

    @staticmethod
    def check_response_format(response_format: dict | None) -> None:
        if response_format and response_format.get("type", "text") != "text":
            raise not_supported("response_format", "response_format "
                                f"{response_format.get('type')!r} (structured output)")

    def check_token_ids(self, ids, param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid_request(f"token id {bad[0]} is out of vocabulary "
                                  f"(vocab_size {self.vocab_size})", param, "invalid_value")

    def check_prompts(self, prompts: list[list[int]], params: SamplingParams,
                      prompt_param: str) -> None:
        """The engine's own prompt check, run before the response starts (a stream cannot turn
        into a 400 later); `prompt_param` is what the 400 names."""
        for ids in prompts:
            try:
                self.engine.engine.check_prompt(ids, params)  # LLMEngine's: pure, thread-safe
            except PromptError as exc:
                raise invalid_request(str(exc), prompt_param, "invalid_value") from None

    def sampling_params(self, req, prompt_len: int, prompt_param: str) -> SamplingParams:
        """Build SamplingParams, refusing (never truncating) what does not fit the context."""
        max_len = self.engine.max_model_len
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
        self.check_token_ids(logit_bias, "logit_bias")
        stop_token_ids = tuple(req.stop_token_ids or ())
        self.check_token_ids(stop_token_ids, "stop_token_ids")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
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
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos,
        )

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
                 raw: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt number, output) for every output of every prompt (engine ids `request_id`, or
        `request_id-<p>` for several prompts), guarded against hang-ups and the deadline."""
        ids = [request_id] if len(prompts) == 1 else \
            [f"{request_id}-{p}" for p in range(len(prompts))]
        gens = [_tagged(p, self.engine.generate(prompts[p], params, ids[p]))
                for p in range(len(prompts))]
        return guarded(merge(gens), raw, self.settings.request_timeout_s)

    def observe(self, out: RequestOutput, timing: dict, now: float) -> None:
        """Feed metrics: TTFT on the request's first token, ITL between a choice's outputs."""
        key = (out.request_id, out.index)
        if out.new_token_ids:
            last = timing.get(key)
            if "first" not in timing:
                timing["first"] = now
                self.metrics.ttft.observe(now - timing["start"])
            elif last is not None:
                self.metrics.itl.observe(now - last)
            timing[key] = now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished and out.index == 0:
            self.metrics.prompt_tokens.inc(out.num_prompt_tokens)
            self.metrics.cached_tokens.inc(max(out.num_cached_tokens, 0))

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

    # ---- text of tokens -------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text


async def _tagged(tag: int, outputs: AsyncIterator[RequestOutput]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    try:
        async for out in outputs:
            yield tag, out
    finally:
        await outputs.aclose()  # aborts the engine request if it is still running


def clean_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isinf(value) or math.isnan(value) else float(value)
