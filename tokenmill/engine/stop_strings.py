"""Stop strings: the output processor's second stage, text deltas -> text safe to stream.

A stop string can straddle token (delta) boundaries and is never emitted, so the matcher holds
back the longest tail of the text that could still grow into a stop string (at most the longest
stop string's length - 1 characters) and releases it once it cannot, or at `flush`.

When several stop strings occur, the one that is complete first in the text stream wins (the
smallest end; on a tie, the longest), so the result does not depend on how the text was split
into deltas. For stop strings that do not overlap this is simply the earliest occurrence.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(stop)
        self._pending = ""  # held-back text: a suffix that is a proper prefix of a stop string

    def feed(self, text_delta: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop string matched or None).

        On a match the text ends right before the stop string; the request is over.
        """
        if not self.stop:
            return text_delta, None
        text = self._pending + text_delta
        matches = [(i + len(s), -len(s), s) for s in self.stop if (i := text.find(s)) != -1]
        if matches:
            end, neg_len, stop = min(matches)
            self._pending = ""
            return text[: end + neg_len], stop
        held = self._partial_suffix_len(text)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held], None

    def flush(self) -> str:
        """The held-back text, when the request ends for another reason."""
        text, self._pending = self._pending, ""
        return text

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that some stop string starts with."""
        longest = max(len(s) for s in self.stop) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
