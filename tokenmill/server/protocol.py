"""OpenAI request and response schemas (pydantic), the server's contract with its clients.

Requests validate types and ranges here so that a client's mistake is a 400 before anything reaches
the engine. Unknown fields are ignored (OpenAI clients send new ones every month); strict mode keeps
`"stream": "yes"` or `"n": "2"` from being coerced into something the client did not mean.
Responses mirror openai-python's types field for field, including the explicit nulls.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenmill.sampling_params import MAX_N, MAX_STOP, MAX_TOP_LOGPROBS


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- requests ---------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class OtherPart(_Request):
    """Any non-text content part (image_url, input_audio, file): answered with a 400 for now."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Request):
    """A call an assistant message made (sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None  # assistant

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class StreamOptions(_Request):
    include_usage: bool = False


NonNegInt = Annotated[int, Field(ge=0)]


class FunctionDefinition(_Request):
    """OpenAI's function tool. The name's rule (^[a-zA-Z0-9_-]{1,64}$) and the schema are
    checked by the chat endpoint, so that the 400 names `tools`."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; None: no parameters
    strict: bool | None = None  # the schema is enforced whatever it says


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`. The schema is enforced whatever `strict` says."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(_Request):
    """Fields shared by chat and text completions, with OpenAI's ranges."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=1024)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: str | None = None
    # Extras that the seed providers accept (vLLM/transformers semantics).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    min_tokens: NonNegInt = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=64)] | None = None
    # Structured outputs: OpenAI's response_format, and vLLM's guided_* extras (one at a time).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    guided_grammar: str | None = None  # GBNF (llama.cpp's) or Lark (llguidance's), by its shape
    guided_decoding_backend: str | None = None  # accepted for vLLM clients; llguidance is used

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[int, float] | None:
        """JSON keys are strings; convert them to token ids here, once (range: serving)."""
        if v is None:
            return None
        out = {}
        for key, bias in v.items():
            try:
                out[int(key)] = bias
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


# ---- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    estimated_cost: float  # USD, from the model's price per 1M tokens (DeepInfra's field)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None
    refusal: None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str  # JSON text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatChunkChoice(_Response):
    index: int
    # {"role": ..., "content": ...}, or {"tool_calls": [{index, id, type, function: {name,
    # arguments: ""}}]} then {"tool_calls": [{index, function: {arguments: <fragment>}}]};
    # {} on the finish chunk
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # sent only with stream_options.include_usage


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None  # sent only with stream_options.include_usage


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class UsageRecordOut(_Response):
    id: str  # the response's id
    model: str
    created: int  # unix seconds
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: float  # USD
    status: str  # completed | aborted | error
    finish_reason: str | None


class UsageList(_Response):
    object: Literal["list"] = "list"
    data: list[UsageRecordOut]
    total_cost: float  # USD, over every record the filters select (all pages)
    has_more: bool


class Pricing(_Response):
    input: float  # USD per 1M prompt tokens
    output: float  # USD per 1M completion tokens
    # (extra) cached_input: USD per 1M cached prompt tokens, where the catalog prices it apart


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    context_length: int
    pricing: Pricing


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail
