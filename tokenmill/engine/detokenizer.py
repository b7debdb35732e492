"""Incremental detokenization: the output processor's first stage, token ids -> text deltas.

The offset algorithm of vLLM / mini-sglang. Each step decodes a small window of ids twice: the
already-emitted prefix `ids[:read]` and the whole window `ids`; the delta is what the second adds
to the first. Decoding with a few tokens of left context gives tokenizers that depend on it (the
leading space of a SentencePiece word) the right text, and a window whose text ends in U+FFFD is
an unfinished multi-byte character (byte-level BPE splits emoji and CJK across tokens), so it is
held back until the following tokens complete it.

Invariant: the deltas of `step` (then `flush`) concatenate to
`tokenizer.decode(output_ids, skip_special_tokens=...)` for a tokenizer whose decode is
concatenative (byte-level BPE), and a delta never ends inside a multi-byte character.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt ids kept as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.output_text = ""  # every delta returned so far, concatenated
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])  # window: [emitted | pending]
        self._read = len(self._ids)  # ids before this index are already in output_text

    def step(self, new_token_ids: list[int]) -> str:
        """Add this step's tokens; return the text they finalize ('' while a char is pending)."""
        self._ids.extend(new_token_ids)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """At the end of a request: the pending text, even if it ends in invalid bytes."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(prefix_text) or (hold_incomplete and text.endswith(REPLACEMENT_CHAR)):
            return ""  # only special tokens, or an unfinished character: wait for more ids
        delta = text[len(prefix_text) :]
        self._ids = self._ids[self._read :]  # the new prefix: the ids just emitted
        self._read = len(self._ids)
        self.output_text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
