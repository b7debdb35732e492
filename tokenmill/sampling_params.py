"""SamplingParams: what the user asked for, validated once, frozen.

It crosses every boundary from the server to the sampler. Semantics follow OpenAI where OpenAI
defines the parameter, and vLLM/transformers for the extras (top_k, min_p, repetition_penalty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_N = 8
MAX_STOP = 16  # stop sequences per request, as OpenAI allows
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit seed, as OpenAI's `seed` is
# A temperature below this samples greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by
# it would overflow, and the distribution is the argmax's already.
GREEDY_BELOW_TEMPERATURE = 1e-5


STRUCTURED_KINDS = ("json_schema", "regex", "choice", "lark", "gbnf")


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output text, enforced token by token by the engine's grammar backend
    (engine/structured.py). Equal specs share one compiled grammar.

    kind "json_schema": spec is a JSON Schema as canonical JSON (`canonical_json`); JSON mode is
      the schema {"type": "object"}. "regex": a regular expression the whole output matches.
      "choice": a JSON list of strings, the output being exactly one of them. "lark": a Lark
      grammar in llguidance's dialect (which embeds JSON schemas with `%json {...}`). "gbnf": a
      llama.cpp GBNF grammar, translated to Lark when compiled.
    """

    kind: str  # one of STRUCTURED_KINDS
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | bool) -> StructuredOutputs:
        return cls("json_schema", canonical_json(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutputs:
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))


def canonical_json(value) -> str:
    """One text per JSON value (sorted keys, no spaces): equal schemas share a cache entry."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class SamplingParamsError(ValueError):
    """A parameter is out of range; `param` names it (the server maps this to a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0  # EOS and stop token ids are masked out until this many tokens exist
    temperature: float = 1.0  # 0 (below GREEDY_BELOW_TEMPERATURE) means greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # drop tokens whose prob < min_p * max prob
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    # transformers' rule, over prompt + generated tokens: a logit > 0 is divided, < 0 multiplied
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to the logit
    seed: int | None = None  # per-request generator: same seed, same output, whatever the batch
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob plus top k
    stop: tuple[str, ...] = ()  # stop strings: output ends before them; never emitted
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end the output (the id is not emitted)
    ignore_eos: bool = False  # keep generating past EOS
    skip_special_tokens: bool = True  # detokenizer drops special tokens from the text
    structured: StructuredOutputs | None = None  # a grammar the output must match; None: free

    def __post_init__(self) -> None:
        # Normalise containers so the object is hashable-ish and immutable in spirit.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        object.__setattr__(self, "logit_bias", bias)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamsError(param, message)

        check(1 <= self.n <= MAX_N, "n", f"n must be between 1 and {MAX_N}, got {self.n}")
        check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"max_tokens must be at least 1, got {self.max_tokens}",
        )
        check(self.min_tokens >= 0, "min_tokens", "min_tokens must be non-negative")
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            "min_tokens must not exceed max_tokens",
        )
        check(0.0 <= self.temperature <= 2.0, "temperature", "temperature must be between 0 and 2")
        check(0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        check(self.top_k >= -1, "top_k", "top_k must be -1, 0 (disabled) or positive")
        check(0.0 <= self.min_p <= 1.0, "min_p", "min_p must be between 0 and 1")
        check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            "presence_penalty must be between -2 and 2",
        )
        check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            "frequency_penalty must be between -2 and 2",
        )
        check(
            0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            "repetition_penalty must be in (0, 2]",
        )
        for token_id, bias in self.logit_bias.items():
            check(-100.0 <= bias <= 100.0, "logit_bias", "logit_bias values must be in [-100, 100]")
            check(token_id >= 0, "logit_bias", f"logit_bias key {token_id} is not a token id")
        check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
            "logprobs",
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
        )
        check(len(self.stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop sequences")
        check(
            self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
            "seed",
            f"seed must be a signed 64-bit integer, in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
        )
        check(all(s for s in self.stop), "stop", "stop sequences must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
