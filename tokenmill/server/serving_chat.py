"""POST /v1/chat/completions: chat template -> engine -> `chat.completion` or its SSE chunks."""

from __future__ import annotations

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.catalog.templates import TemplateError
from tokenmill.prompts import render_chat
from tokenmill.server.errors import invalid_request, not_supported
from tokenmill.server.models import ServedModel
from tokenmill.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                       ChatCompletionChunk, ChatCompletionRequest,
                                       ChatCompletionResponse, ChoiceLogprobs, OtherPart,
                                       TokenLogprob, TopLogprob, Usage)
from tokenmill.server.serving import (TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE, Job,
                                      OpenAIServing, clean_logprob, utf8_bytes)
from tokenmill.server.state import Demand


class ChatServing(OpenAIServing):
    endpoint = "chat"
    id_prefix = "chatcmpl"

    def check_supported(self, req: ChatCompletionRequest) -> None:
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

    def demand(self, model: ServedModel, req: ChatCompletionRequest) -> Demand:
        prompt = TEMPLATE_TOKENS + sum(
            TEMPLATE_TOKENS_PER_MESSAGE + utf8_bytes(m.text(), f"messages.{i}.content")
            for i, m in enumerate(req.messages))
        return Demand(req.n, req.n * (prompt + self.max_tokens_bound(model, req)))

    def prepare(self, model: ServedModel, req: ChatCompletionRequest) -> Job:
        prompt = self.render(model, req)
        params = self.sampling_params(model, req, len(prompt), "messages")
        self.check_prompts(model, [prompt], params, "messages")
        return Job(model=model, prompts=[prompt], params=params, echo=[""])

    @staticmethod
    def render(model: ServedModel, req: ChatCompletionRequest) -> list[int]:
        if model.chat_template is None:
            raise invalid_request(f"The model `{model.id}` has no chat template; use "
                                  "/v1/completions with a raw prompt.", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            return render_chat(model.chat_template, model.tokenizer, messages)
        except TemplateError as exc:  # the template refused this conversation
            raise invalid_request(f"The chat template rejected the messages: {exc}",
                                  "messages") from None

    def logprobs(self, job: Job, entries: list[TokenLogprobs], k: int,
                 offset: int) -> ChoiceLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = job.model.token_text(token_id)
            return TopLogprob(token=text, logprob=clean_logprob(logprob),
                              bytes=list(text.encode("utf-8")))

        content = []
        for e in entries:
            t = top(e.token_id, e.logprob)
            content.append(TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                                        top_logprobs=[top(i, lp) for i, lp in e.top[:k]]))
        return ChoiceLogprobs(content=content)

    def choice(self, index: int, text: str, logprobs: ChoiceLogprobs | None,
               finish_reason: str | None) -> ChatChoice:
        return ChatChoice(index=index, message=AssistantMessage(content=text), logprobs=logprobs,
                          finish_reason=finish_reason)

    def response(self, job: Job, request_id: str, choices: list[ChatChoice],
                 usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=request_id, model=job.model.id, choices=choices,
                                      usage=usage, system_fingerprint=job.model.fingerprint)

    def opening_choices(self, num_choices: int) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})
                for i in range(num_choices)]

    def delta_choice(self, index: int, text: str | None, logprobs: ChoiceLogprobs | None,
                     finish_reason: str | None) -> ChatChunkChoice:
        delta = {} if text is None else {"content": text}
        return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                               finish_reason=finish_reason)

    def chunk(self, job: Job, request_id: str, created: int, choices: list[ChatChunkChoice],
              usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=job.model.id,
                                   system_fingerprint=job.model.fingerprint, choices=choices,
                                   usage=usage)
