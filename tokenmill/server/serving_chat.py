"""POST /v1/chat/completions: chat template -> engine -> `chat.completion` or its SSE chunks.

With tools (tool_requests.py says what each tool_choice means), the choices' text is parsed
for calls (tool_stream.py): whole for a full response, as it grows for a stream, and a choice
that made calls finishes with "tool_calls" (unless max_tokens cut it: "length").
"""

from __future__ import annotations

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.catalog.templates import TemplateError
from tokenmill.prompts import render_chat
from tokenmill.sampling_params import StructuredOutputs
from tokenmill.server.errors import invalid_request, not_supported
from tokenmill.server.models import ServedModel
from tokenmill.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                       ChatCompletionChunk, ChatCompletionRequest,
                                       ChatCompletionResponse, ChoiceLogprobs, FunctionCallOut,
                                       OtherPart, TokenLogprob, ToolCallOut, TopLogprob, Usage)
from tokenmill.server.serving import (TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE,
                                      ChoiceStream, Job, OpenAIServing, clean_logprob,
                                      compiled, utf8_bytes)
from tokenmill.server.state import Demand
from tokenmill.server.tool_requests import (check_tools, parses_calls, template_messages,
                                            tool_grammar, tools_bytes)
from tokenmill.server.tool_stream import ArgumentsDelta, CallStart, ToolCallExtractor, parse


class ChatServing(OpenAIServing):
    endpoint = "chat"
    id_prefix = "chatcmpl"

    def check_supported(self, req: ChatCompletionRequest) -> None:
        if req.top_logprobs and not req.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", "top_logprobs",
                                  "invalid_value")
        check_tools(req)
        for i, message in enumerate(req.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, OtherPart):
                        raise not_supported(f"messages.{i}.content.{j}.type",
                                            f"content part type {part.type!r}")

    def demand(self, model: ServedModel, req: ChatCompletionRequest) -> Demand:
        prompt = TEMPLATE_TOKENS + tools_bytes(req) + sum(
            TEMPLATE_TOKENS_PER_MESSAGE + utf8_bytes(m.text(), f"messages.{i}.content")
            + sum(len(c.function.arguments) + len(c.function.name) for c in m.tool_calls or ())
            for i, m in enumerate(req.messages))
        return Demand(req.n, req.n * (prompt + self.max_tokens_bound(model, req)))

    def prepare(self, model: ServedModel, req: ChatCompletionRequest) -> Job:
        prompt = self.render(model, req)
        params = self.sampling_params(model, req, len(prompt), "messages")
        self.check_prompts(model, [prompt], params, "messages")
        return Job(model=model, prompts=[prompt], params=params, echo=[""],
                   tool_format=model.tool_format if parses_calls(req) else None)

    def constraint(self, model: ServedModel, req: ChatCompletionRequest
                   ) -> StructuredOutputs | None:
        """The tool grammar when tool_choice asks for one (check_tools refused it together with
        another constraint), else the request's own constraint."""
        grammar = tool_grammar(model.tool_format, req, model.tokenizer)
        if grammar is None:
            return super().constraint(model, req)
        return compiled(model, grammar, "tools")  # a parameters schema may not compile

    @staticmethod
    def render(model: ServedModel, req: ChatCompletionRequest) -> list[int]:
        if model.chat_template is None:
            raise invalid_request(f"The model `{model.id}` has no chat template; use "
                                  "/v1/completions with a raw prompt.", "messages")
        messages, tools = template_messages(req, model.tool_format, model.renders_tools)
        try:
            return render_chat(model.chat_template, model.tokenizer, messages, tools)
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

    def full_choice(self, job: Job, index: int, text: str, logprobs: ChoiceLogprobs | None,
                    finish_reason: str | None) -> ChatChoice:
        if job.tool_format is None:
            return self.choice(index, text, logprobs, finish_reason)
        parsed = parse(job.tool_format, text, cut=finish_reason == "length")
        if not parsed.calls:
            return self.choice(index, text, logprobs, finish_reason)
        calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                 for c in parsed.calls]
        return ChatChoice(index=index, logprobs=logprobs,
                          message=AssistantMessage(content=parsed.content, tool_calls=calls),
                          finish_reason=_calls_finish(finish_reason))

    def choice_stream(self, job: Job, index: int) -> ChoiceStream:
        if job.tool_format is None:
            return ChoiceStream(self, index)
        return ToolChoiceStream(self, index, ToolCallExtractor(job.tool_format))

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


def _calls_finish(finish_reason: str | None) -> str | None:
    return finish_reason if finish_reason in (None, "length") else "tool_calls"


class ToolChoiceStream(ChoiceStream):
    """A streamed choice whose text may hold tool calls: content deltas for the text before
    them, then per call one delta with its index, id, type and name (arguments "") and deltas
    with fragments of its arguments. Logprobs ride on the first choice of their text (on an
    empty delta while the text is held back)."""

    def __init__(self, serving: ChatServing, index: int, extractor: ToolCallExtractor):
        super().__init__(serving, index)
        self.extractor = extractor

    def text(self, text: str, logprobs: ChoiceLogprobs | None) -> list:
        choices = self._choices(self.extractor.feed(text))
        if not choices:
            return [] if logprobs is None else [ChatChunkChoice(index=self.index, delta={},
                                                                logprobs=logprobs)]
        choices[0].logprobs = logprobs
        return choices

    def finish(self, finish_reason: str) -> list:
        reason = finish_reason if self.extractor.num_calls == 0 else _calls_finish(finish_reason)
        return self._choices(self.extractor.finish()) + [
            ChatChunkChoice(index=self.index, delta={}, finish_reason=reason)]

    def _choices(self, deltas: list) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(index=self.index, delta=_delta(d)) for d in deltas]


def _delta(d) -> dict:
    if isinstance(d, str):
        return {"content": d}
    if isinstance(d, CallStart):
        return {"tool_calls": [{"index": d.index, "id": d.id, "type": "function",
                                "function": {"name": d.name, "arguments": ""}}]}
    assert isinstance(d, ArgumentsDelta)
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}
