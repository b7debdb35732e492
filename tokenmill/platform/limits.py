"""Rate limits and budgets: admission of one request against its key's rpm, tpm and budget.

Stage: between auth (key -> principal and its `Limits`) and the engine. The server calls
`reserve` before queueing a request (429 on `RateLimited`), `finish` once its usage record is in
the ledger (completed, aborted or failed alike), and `headers` for every response. `Limiter` is the
seam: `InProcessLimiter` serves one server process; `RedisLimiter` (redis_limits.py) shares the
same rules between several processes, deciding in Redis with the helpers below for its messages.

Windows: sliding 60 s logs, not token buckets. Each admitted request is remembered, with its token
count, until 60 s after its admission, and admission looks at exactly the requests admitted in the
last 60 s. So "at most rpm requests in any 60 s span" holds exactly, and N simultaneous requests
against rpm L give exactly L admissions. A bucket refilling continuously would not: it admits a
burst of L, then one more every 60/L s, so one 60 s span can hold nearly 2L. The price is O(rpm)
remembered requests per key, small at API rates.

Rules, all decided under one lock (concurrent requests cannot race past a limit; a refusal
changes nothing):
- rpm: admit iff fewer than rpm requests were admitted in the window (now - 60 s, now].
- tpm: admit iff the window's tokens plus this reservation (prompt + max_tokens) <= tpm. `finish`
  replaces the reservation by the tokens really used, so a request that stopped early frees the
  difference for the rest of its window. A request larger than tpm is refused for good (no
  Retry-After: waiting cannot help).
- budget: admit iff spent + reserved < budget, `reserved` summing the cost reservations (the most
  each request can cost) of unfinished requests. Every admission saw spent + reserved below the
  budget, so the final spend stays below budget + one reservation: concurrent requests overshoot
  by at most one request's reservation, and a budget smaller than one request admits exactly one.
  The budget is checked first: it does not come back by waiting.

Spend: `reserve` gets the key's spend as the caller read it from the ledger. That read can miss a
request which finished between the read and `reserve` (its reservation released, its cost not in
the figure), which would let such costs slip past the budget. So the limiter keeps the spend it
knows per key: the ledger's figure is taken (as a maximum) only while the key has no unfinished
reservation, when it can lack nothing the limiter has not already counted, and each `finish` adds
the request's true cost. Spend that other processes write is seen whenever the key is idle.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0  # the span of rpm and tpm


@dataclass(frozen=True)
class Limits:
    """A key's limits; None means unlimited."""

    rpm: int | None  # requests admitted per sliding 60 s, >= 1
    tpm: int | None  # tokens (reserved, then used) per sliding 60 s, >= 1
    budget_pico: int | None  # lifetime spend cap in picodollars, >= 0

    def __post_init__(self) -> None:
        for name, least in (("rpm", 1), ("tpm", 1), ("budget_pico", 0)):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < least):
                raise ValueError(f"{name} must be None or an integer >= {least}, not {value!r}")


@dataclass(frozen=True)
class Reservation:
    """What admission took; hand it back to `finish` (again is harmless)."""

    id: int  # unique among its key's reservations: what makes `finish` idempotent
    key_id: int  # the key it counts against
    tokens: int  # reserved against tpm: prompt + max_tokens
    cost_pico: int  # reserved against the budget: the most the request can cost
    request_ts: float  # the limiter's clock at admission


@dataclass(frozen=True)
class KeyUsage:
    """What a key holds in the limiter now."""

    requests: int  # requests admitted in the last 60 s
    tokens: int  # their tokens: reserved for unfinished ones, used for finished ones
    open: int  # unfinished reservations
    reserved_pico: int  # sum of the unfinished reservations' cost_pico
    spent_pico: int  # the spend the limiter knows (see the module docstring)


class RateLimited(Exception):
    """A refusal: HTTP 429 with OpenAI's error `code` and these `headers`."""

    def __init__(self, code: str, message: str, retry_after_s: int | None,
                 headers: dict[str, str]) -> None:
        super().__init__(message)
        self.code = code  # "rate_limit_exceeded" or "insufficient_quota"
        self.message = message  # for the error body, in OpenAI's wording
        self.retry_after_s = retry_after_s  # whole seconds >= 1; None: waiting will not help
        self.headers = headers  # x-ratelimit-*, and retry-after unless retry_after_s is None
        if retry_after_s is not None:
            self.headers = {**headers, "retry-after": str(retry_after_s)}


class LimiterUnavailable(RuntimeError):
    """Where the limiter keeps its counts cannot be reached (Redis down); the server answers 503.
    The message is one line and holds no password."""


class Limiter(ABC):
    """The seam between the server and where limits are kept (this process, or Redis)."""

    @abstractmethod
    def reserve(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                spent_pico: int) -> Reservation:
        """Atomically count one request against rpm, `tokens` against tpm and `cost_pico` against
        the budget (`spent_pico`: the key's spend in the ledger), or raise `RateLimited` having
        changed nothing."""

    @abstractmethod
    def finish(self, reservation: Reservation, tokens: int, cost_pico: int) -> None:
        """The request ended (completed, aborted or failed) having used `tokens` and cost
        `cost_pico`, now in the ledger: reconcile tpm to the true count (it still counts as one
        request) and release the budget reservation. Idempotent."""

    @abstractmethod
    def headers(self, key_id: int, limits: Limits) -> dict[str, str]:
        """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for the limits set."""

    def reserve_with_headers(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                             spent_pico: int) -> tuple[Reservation, dict[str, str]]:
        """`reserve`, and the headers of the window as the admission left it (what the admitted
        response carries). Backends whose calls are round trips do both in one."""
        reservation = self.reserve(key_id, limits, tokens, cost_pico, spent_pico)
        return reservation, self.headers(key_id, limits)

    @abstractmethod
    def usage(self, key_id: int) -> KeyUsage:
        """What the key holds now (for invariants and admin views)."""


@dataclass(slots=True)
class Admitted:
    ts: float  # admission time on the limiter's clock
    tokens: int  # reserved; the true count once finished


@dataclass
class Window:
    """A key's requests admitted less than 60 s ago: what rpm and tpm look at."""

    entries: deque[Admitted] = field(default_factory=deque)  # oldest first
    tokens: int = 0  # sum of the entries' tokens


@dataclass
class _KeyState:
    window: Window = field(default_factory=Window)
    open: dict[int, tuple[Reservation, Admitted]] = field(default_factory=dict)  # unfinished
    reserved_pico: int = 0  # sum of cost_pico over `open`
    spent_pico: int = 0  # spend known: ledger figure taken while idle + true costs finished since


class InProcessLimiter(Limiter):
    """Limits for one process: per-key sliding windows and reservations under one lock.

    Invariants (`check_integrity`): each window is in admission order and holds only requests
    admitted less than 60 s ago; its `tokens` is the sum of its entries'; reserved_pico is the sum
    of the unfinished reservations' costs; no count is negative. One small state is kept per key
    ever seen (keys are few; forgetting one would forget spend the ledger may not show yet)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # seconds, never decreasing
        self._lock = threading.Lock()
        self._keys: dict[int, _KeyState] = {}
        self._ids = itertools.count(1)

    def reserve(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                spent_pico: int) -> Reservation:
        check_counts(tokens=tokens, cost_pico=cost_pico, spent_pico=spent_pico)
        with self._lock:
            now = self._clock()
            state = self._state(key_id, now)
            spent = state.spent_pico if state.open else max(state.spent_pico, spent_pico)
            check_budget(state.window, limits, spent, state.reserved_pico, now)
            check_rate(state.window, limits, tokens, now)
            entry = Admitted(now, tokens)
            reservation = Reservation(next(self._ids), key_id, tokens, cost_pico, now)
            state.window.entries.append(entry)
            state.window.tokens += tokens
            state.open[reservation.id] = (reservation, entry)
            state.reserved_pico += cost_pico
            state.spent_pico = spent
            return reservation

    def finish(self, reservation: Reservation, tokens: int, cost_pico: int) -> None:
        check_counts(tokens=tokens, cost_pico=cost_pico)
        with self._lock:
            now = self._clock()
            state = self._state(reservation.key_id, now)
            held = state.open.pop(reservation.id, None)
            if held is None:
                return  # finished before: nothing to hand back twice
            taken, entry = held
            if now - entry.ts < WINDOW_S:  # still in the window: it counts what it used
                state.window.tokens += tokens - entry.tokens
                entry.tokens = tokens
            state.reserved_pico -= taken.cost_pico
            state.spent_pico += cost_pico

    def headers(self, key_id: int, limits: Limits) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            return window_headers(self._state(key_id, now).window, limits, now)

    def usage(self, key_id: int) -> KeyUsage:
        with self._lock:
            state = self._state(key_id, self._clock())
            return KeyUsage(len(state.window.entries), state.window.tokens, len(state.open),
                            state.reserved_pico, state.spent_pico)

    def check_integrity(self) -> None:
        with self._lock:
            now = self._clock()
            for state in self._keys.values():
                _prune(state.window, now)
                entries = state.window.entries
                times = [entry.ts for entry in entries]
                assert times == sorted(times) and all(now - ts < WINDOW_S for ts in times)
                assert state.window.tokens == sum(entry.tokens for entry in entries)
                assert all(entry.tokens >= 0 for entry in entries)
                assert state.reserved_pico == sum(r.cost_pico for r, _ in state.open.values())
                assert state.reserved_pico >= 0 and state.spent_pico >= 0

    def _state(self, key_id: int, now: float) -> _KeyState:
        state = self._keys.setdefault(key_id, _KeyState())
        _prune(state.window, now)
        return state


def _prune(window: Window, now: float) -> None:
    """Drop the requests admitted 60 s ago or more (the window is (now - 60 s, now])."""
    while window.entries and now - window.entries[0].ts >= WINDOW_S:
        window.tokens -= window.entries.popleft().tokens


# The rules' messages and headers, shared by every backend: each checks its own state (under its
# lock, or in its Redis script) and builds what the client sees with these.

def check_budget(window: Window, limits: Limits, spent: int, reserved: int, now: float) -> None:
    """Raise `RateLimited` (insufficient_quota) unless spent + reserved is below the budget."""
    budget = limits.budget_pico
    if budget is not None and spent + reserved >= budget:
        raise RateLimited(
            "insufficient_quota",
            f"You exceeded your current quota: this key's budget is USD {_usd(budget)} and it "
            f"has spent USD {_usd(spent)} with USD {_usd(reserved)} reserved by requests in "
            "flight.", None, window_headers(window, limits, now))


def check_rate(window: Window, limits: Limits, tokens: int, now: float) -> None:
    """Raise `RateLimited` unless one more request of `tokens` fits rpm and tpm now."""
    entries = window.entries
    waits, reasons = [], []
    if limits.rpm is not None and len(entries) >= limits.rpm:
        # the request that must leave the window for one more to fit
        waits.append(entries[len(entries) - limits.rpm].ts + WINDOW_S - now)
        reasons.append(f"requests per min (RPM): Limit {limits.rpm}, Used {len(entries)}, "
                       "Requested 1")
    if limits.tpm is not None and tokens > limits.tpm:
        raise RateLimited(
            "rate_limit_exceeded",
            f"Request too large for tokens per min (TPM): Limit {limits.tpm}, Requested {tokens}. "
            "Send fewer prompt tokens or a smaller max_tokens.", None,
            window_headers(window, limits, now))
    if limits.tpm is not None and window.tokens + tokens > limits.tpm:
        excess = window.tokens + tokens - limits.tpm
        for entry in entries:  # the oldest requests whose leaving frees `excess` tokens
            excess -= entry.tokens
            if excess <= 0:
                waits.append(entry.ts + WINDOW_S - now)
                break
        reasons.append(f"tokens per min (TPM): Limit {limits.tpm}, Used {window.tokens}, "
                       f"Requested {tokens}")
    if waits:
        wait = max(waits)
        raise RateLimited(
            "rate_limit_exceeded",
            f"Rate limit reached for {' and '.join(reasons)}. "
            f"Please try again in {format_duration(wait)}.",
            max(1, math.ceil(wait - 1e-9)), window_headers(window, limits, now))


def window_headers(window: Window, limits: Limits, now: float) -> dict[str, str]:
    """`rate_headers` of a whole window."""
    entries = window.entries
    newest = entries[-1].ts if entries else None
    counting = next((entry.ts for entry in reversed(entries) if entry.tokens), None)
    return rate_headers(limits, now, len(entries), window.tokens, newest, counting)


def rate_headers(limits: Limits, now: float, requests: int, tokens: int, newest: float | None,
                 newest_counting: float | None) -> dict[str, str]:
    """The headers of a window holding `requests` requests and `tokens` tokens, the newest
    admitted at `newest` and the newest holding tokens at `newest_counting` (None: no such
    request). Reset: when the window is back to its full limit (that request leaves it)."""
    headers = {}
    if limits.rpm is not None:
        last = newest + WINDOW_S - now if newest is not None else 0.0
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - requests))
        headers["x-ratelimit-reset-requests"] = format_duration(last)
    if limits.tpm is not None:
        last = newest_counting + WINDOW_S - now if newest_counting is not None else 0.0
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - tokens))
        headers["x-ratelimit-reset-tokens"] = format_duration(last)
    return headers


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go's style), rounded up to whole
    milliseconds: "0s", "20ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")


def _usd(pico: int) -> str:
    """Picodollars as an exact USD string ("0.000012", "5")."""
    whole, frac = divmod(pico, 10**12)
    return f"{whole}.{frac:012d}".rstrip("0").rstrip(".") if frac else str(whole)
