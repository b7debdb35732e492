"""Generated text -> content and tool calls, incrementally: the one parser of tool calls, used
whole (`parse`) for a full response and piece by piece (`ToolCallExtractor`) for a stream.

The reply is content, then (from the format's marker on) a calls region, in which every
`{"name": "<name>", "arguments"|"parameters": {...}}` object is a call; what lies between two
calls (closers, separators, the next marker) is the grammar's and is not checked.

Streaming invariants:
- Nothing emitted is ever retracted: content that could still be the start of a marker is held
  back; a call's first delta (index, id, name) goes out once its name is complete; its
  arguments go out as they grow, character for character the text of the arguments object.
- So the deltas of any split of a text, joined, equal `parse` of the whole text (the fragments
  of a call joined are its `arguments`), which the tests check split by split.
A region that never yields a well-formed call (only possible without a grammar) is flushed as
content at the end; `parse` then returns the whole text as content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tokenmill.server.tool_formats import ToolFormat, new_call_id

# A call's head up to its arguments' opening brace (names never need escaping: ^[\w-]{1,64}$).
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')


@dataclass
class CallStart:
    index: int  # the call's position among the choice's calls
    id: str  # call_<24 alphanumerics>
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str  # the next characters of the call's arguments JSON text


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # the JSON text the model wrote (compact under the grammar)


@dataclass
class Parsed:
    content: str | None  # None when calls were made and no text preceded them
    calls: list[ParsedCall] = field(default_factory=list)
    complete: bool = True  # every call's arguments closed (False: cut, or malformed)


class ToolCallExtractor:
    """One choice's text -> deltas: `str` (content), `CallStart`, `ArgumentsDelta`."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._held = ""  # content not yet emitted: it may begin a marker
        self._in_text = True  # before the calls region
        self._started = False  # some content went out: `at_start` markers are over
        self._region = ""  # calls region text not yet consumed
        self._raw_region = ""  # the whole region, for the flush of one that made no call
        self._args_depth = 0  # > 0: inside call `self._calls - 1`'s arguments
        self._in_string = False
        self._escaped = False
        self.num_calls = 0

    @property
    def complete(self) -> bool:
        """Every call's arguments are closed (and at least one call was made)."""
        return self.num_calls > 0 and self._args_depth == 0

    def feed(self, text: str) -> list:
        out: list = []
        if self._in_text:
            text = self._text(self._held + text, out)
            if self._in_text:
                return out
        self._region += text
        self._raw_region += text
        self._scan(out)
        return out

    def finish(self) -> list:
        """Deltas of what was held back, the text being over."""
        if self._in_text:
            out = [self._held] if self._held else []
            self._held = ""
            return out
        if self.num_calls == 0:  # a marker followed by no call: it was content after all
            flush, self._raw_region, self._region = self._raw_region, "", ""
            return [flush] if flush else []
        return []

    def _text(self, text: str, out: list) -> str:
        """Emit the content in `text`; return what follows a marker (entering the region)."""
        at, at_start = self._marker_at(text)
        if at is not None:
            if at and not at_start:  # whitespace before an at-start marker is dropped
                out.append(text[:at])
            self._in_text, self._held = False, ""
            return text[at:]
        keep = self._holdback(text)
        if len(text) > keep:
            out.append(text[:len(text) - keep])
            if text[:len(text) - keep].strip():
                self._started = True
        self._held = text[len(text) - keep:]
        return ""

    def _marker_at(self, text: str) -> tuple[int | None, bool]:
        """(where the first marker in `text` begins, whether it is an at-start one)."""
        found = []
        for marker in self.fmt.markers:
            if marker.at_start:
                lead = len(text) - len(text.lstrip())
                if not self._started and text.startswith(marker.text, lead):
                    found.append((lead, True))
            else:
                i = text.find(marker.text)
                if i >= 0:
                    found.append((i, False))
        return min(found) if found else (None, False)

    def _holdback(self, text: str) -> int:
        """How many trailing characters of `text` could still begin a marker."""
        keep = 0
        for marker in self.fmt.markers:
            if marker.at_start:
                stripped = text.lstrip()
                if not self._started and marker.text.startswith(stripped):
                    keep = max(keep, len(text))
                continue
            for n in range(min(len(marker.text) - 1, len(text)), 0, -1):
                if marker.text.startswith(text[-n:]):
                    keep = max(keep, n)
                    break
        return keep

    def _scan(self, out: list) -> None:
        while self._region:
            if self._args_depth == 0:
                head = _HEAD.search(self._region)
                if head is None:
                    return  # wait for more text
                self._raw_region = ""  # a call was found: nothing of it is ever content
                out.append(CallStart(self.num_calls, new_call_id(), head.group(1)))
                self.num_calls += 1
                self._region = self._region[head.end() - 1:]  # from the opening brace
                self._in_string = self._escaped = False
            n = self._arguments_length(self._region)
            out.append(ArgumentsDelta(self.num_calls - 1, self._region[:n]))
            self._region = self._region[n:]

    def _arguments_length(self, text: str) -> int:
        """Characters of `text` that belong to the open arguments object (all of them, or up to
        and including its closing brace); updates the depth and string state."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._args_depth += 1
            elif ch in "}]":
                self._args_depth -= 1
                if self._args_depth == 0:
                    return i + 1
        return len(text)


def fold(deltas: list) -> Parsed:
    """The deltas of one choice, joined: the content and the calls."""
    content, calls = "", []
    for d in deltas:
        if isinstance(d, str):
            content += d
        elif isinstance(d, CallStart):
            calls.append(ParsedCall(d.id, d.name, ""))
        else:
            calls[d.index].arguments += d.text
    return Parsed(content=content or (None if calls else ""), calls=calls)


def parse(fmt: ToolFormat, text: str, cut: bool = False) -> Parsed:
    """The whole reply `text`: its content and calls. A reply whose calls do not close is
    content (text that is not a well-formed call is never lost), unless `cut` (max_tokens):
    then the calls stay as far as they go, as a stream would have sent them."""
    extractor = ToolCallExtractor(fmt)
    parsed = fold(extractor.feed(text) + extractor.finish())
    parsed.complete = extractor.complete
    if parsed.calls and not extractor.complete and not cut:
        return Parsed(content=text, calls=[], complete=False)
    return parsed
