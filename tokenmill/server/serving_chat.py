"""POST /v1/chat/completions: chat template -> engine -> `chat.completion` or its SSE chunks."""

from __future__ import annotations

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.prompts import render_chat
from tokenmill.server.errors import invalid_request, not_supported
from tokenmill.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                       ChatCompletionChunk, ChatCompletionRequest,
                                       ChatCompletionResponse, ChoiceLogprobs, OtherPart,
                                       TokenLogprob, TopLogprob, Usage)
from tokenmill.server.serving import Job, OpenAIServing, clean_logprob


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

    def prepare(self, req: ChatCompletionRequest) -> Job:
        prompt = self.render(req)
        params = self.sampling_params(req, len(prompt), "messages")
        self.check_prompts([prompt], params, "messages")
        return Job(prompts=[prompt], params=params, echo=[""])

    def render(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            return render_chat(self.tokenizer, messages)
        except Exception as exc:  # the template refused this conversation (jinja raise_exception)
            raise invalid_request(f"The chat template rejected the messages: {exc}", "messages")

    def logprobs(self, entries: list[TokenLogprobs], k: int, offset: int) -> ChoiceLogprobs:
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

    def choice(self, index: int, text: str, logprobs: ChoiceLogprobs | None,
               finish_reason: str | None) -> ChatChoice:
        return ChatChoice(index=index, message=AssistantMessage(content=text), logprobs=logprobs,
                          finish_reason=finish_reason)

    def response(self, request_id: str, choices: list[ChatChoice],
                 usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=request_id, model=self.settings.model_id, choices=choices,
                                      usage=usage, system_fingerprint=self.settings.fingerprint)

    def opening_choices(self, num_choices: int) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})
                for i in range(num_choices)]

    def delta_choice(self, index: int, text: str | None, logprobs: ChoiceLogprobs | None,
                     finish_reason: str | None) -> ChatChunkChoice:
        delta = {} if text is None else {"content": text}
        return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                               finish_reason=finish_reason)

    def chunk(self, request_id: str, created: int, choices: list[ChatChunkChoice],
              usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=self.settings.model_id,
                                   system_fingerprint=self.settings.fingerprint, choices=choices,
                                   usage=usage)
