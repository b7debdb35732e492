"""Structured outputs: grammars compiled once per constraint, and each request's grammar state.

The backend is llguidance (docs/ARCHITECTURE.md says why not xgrammar). `GrammarCompiler`
turns a `StructuredOutputs` into a pristine `llguidance.LLMatcher`, cached by the constraint's
canonical text; every choice of a request gets its own `deep_copy` of it (~20 us) as a
`Grammar`, which the scheduler advances with each sampled token. The runner's GrammarMasks
(runner/grammar_mask.py) reads the same matchers to build the step's token masks.

Invariant: a request's grammar has consumed exactly its `output_token_ids`, in order. Preemption
keeps the output tokens (the KV is recomputed, not the tokens), so it keeps the grammar state as
it is; abort and a failed step end the request, and its grammar with it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from tokenmill.sampling_params import StructuredOutputs

COMPILED_CACHE_SIZE = 256  # pristine matchers kept, least recently used evicted first
# Compact JSON (no whitespace between tokens): the output is what OpenAI's JSON mode writes, and
# a small model cannot wander into endless newlines between two keys.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The constraint cannot be compiled: an invalid or unsupported schema, regex or grammar.
    The message says what is wrong, in the grammar library's words."""


class Grammar:
    """One choice's position in its grammar. Only the scheduler advances it (`accept`); the
    runner reads `matcher` to compute the next token mask."""

    def __init__(self, matcher):
        self.matcher = matcher  # llguidance.LLMatcher, never shared with another choice

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar refused it (it then stays in an
        error state, and `is_terminated` is True)."""
        return self.matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """Nothing can follow: the grammar consumed EOS at an accepting point, or it failed."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Compiles constraints against one tokenizer; thread-safe, so the server can compile in a
    worker thread (a large schema takes up to a second) before the request reaches the engine."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        """`tokenizer`: a transformers fast tokenizer; `vocab_size`: the logits' columns (the
        masks' width); `eos_token_ids`: what a finished grammar allows next."""
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None  # built on first use: ~0.6 s for a 49k vocabulary
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutputs, object] = OrderedDict()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutputs):
        """The pristine matcher of `spec` (never advance it: `grammar` copies it); raises
        GrammarError when `spec` does not compile."""
        with self._lock:
            matcher = self._compiled.get(spec)
            if matcher is not None:
                self._compiled.move_to_end(spec)
                return matcher
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar_source(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        with self._lock:
            self._compiled[spec] = matcher
            while len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def grammar(self, spec: StructuredOutputs) -> Grammar:
        """A fresh grammar state for one choice."""
        return Grammar(self.compile(spec).deep_copy())


def grammar_source(spec: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON form) of a constraint; GrammarError for input that is
    not even well-formed (the matcher reports the rest)."""
    import llguidance

    if spec.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)
        except ValueError as exc:  # not JSON, or not an object schema (`true`, `false`)
            raise GrammarError(f"the schema is not a JSON Schema object: {exc}") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        choices = json.loads(spec.spec)
        if not choices:
            raise GrammarError("there must be at least one choice")
        # A JSON string literal is a valid Lark string literal with the same value.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if spec.kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(spec.spec)
        except Exception as exc:  # GbnfToLarkError, or a plain Exception for an unknown rule
            message = _one_line(str(exc))
            raise GrammarError(f"the GBNF grammar does not parse: {message}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)
    return llguidance.LLMatcher.grammar_from_lark(spec.spec)  # "lark"


MAX_ERROR_CHARS = 500


def _one_line(message: str) -> str:
    """A library's error (often several lines: a regex error draws a caret) as one line."""
    line = " ".join(message.split()) or "the grammar is invalid"
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."
