"""Rate limits and budgets: admission of one request against its key's rpm, tpm and budget.

Stage: between auth (key -> principal and its `Limits`) and the engine. The server calls
`reserve` before queueing a request (429 on `RateLimited`), `finish` once its usage record is in
the ledger (completed, aborted or failed alike), and `headers` for every response. `Limiter` is the
seam: `InProcessLimiter` serves one server process; several processes need a shared backend
(Redis) behind the same three methods.

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

    id: int  # unique per limiter: what makes `finish` idempotent
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


class Limiter(ABC):
    """The seam between the server and where limits are kept (this process now, Redis later)."""

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


@dataclass(slots=True)
class _Admitted:
    ts: float  # admission time on the limiter's clock
    tokens: int  # reserved; the true count once finished


@dataclass
class _KeyState:
    window: deque[_Admitted] = field(default_factory=deque)  # admitted < 60 s ago, oldest first
    window_tokens: int = 0  # sum of the window's tokens
    open: dict[int, tuple[Reservation, _Admitted]] = field(default_factory=dict)  # unfinished
    reserved_pico: int = 0  # sum of cost_pico over `open`
    spent_pico: int = 0  # spend known: ledger figure taken while idle + true costs finished since


class InProcessLimiter(Limiter):
    """Limits for one process: per-key sliding windows and reservations under one lock.

    Invariants (`check_integrity`): each window is in admission order and holds only requests
    admitted less than 60 s ago; window_tokens is the sum of its tokens; reserved_pico is the sum
    of the unfinished reservations' costs; no count is negative. One small state is kept per key
    ever seen (keys are few; forgetting one would forget spend the ledger may not show yet)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # seconds, never decreasing
        self._lock = threading.Lock()
        self._keys: dict[int, _KeyState] = {}
        self._ids = itertools.count(1)

    def reserve(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                spent_pico: int) -> Reservation:
        _check_counts(tokens=tokens, cost_pico=cost_pico, spent_pico=spent_pico)
        with self._lock:
            now = self._clock()
            state = self._state(key_id, now)
            spent = state.spent_pico if state.open else max(state.spent_pico, spent_pico)
            budget = limits.budget_pico
            if budget is not None and spent + state.reserved_pico >= budget:
                raise RateLimited(
                    "insufficient_quota",
                    f"You exceeded your current quota: this key's budget is USD {_usd(budget)} "
                    f"and it has spent USD {_usd(spent)} with USD {_usd(state.reserved_pico)} "
                    "reserved by requests in flight.", None, _headers(state, limits, now))
            _check_rate(state, limits, tokens, now)
            entry = _Admitted(now, tokens)
            reservation = Reservation(next(self._ids), key_id, tokens, cost_pico, now)
            state.window.append(entry)
            state.window_tokens += tokens
            state.open[reservation.id] = (reservation, entry)
            state.reserved_pico += cost_pico
            state.spent_pico = spent
            return reservation

    def finish(self, reservation: Reservation, tokens: int, cost_pico: int) -> None:
        _check_counts(tokens=tokens, cost_pico=cost_pico)
        with self._lock:
            now = self._clock()
            state = self._state(reservation.key_id, now)
            held = state.open.pop(reservation.id, None)
            if held is None:
                return  # finished before: nothing to hand back twice
            taken, entry = held
            if now - entry.ts < WINDOW_S:  # still in the window: it counts what it used
                state.window_tokens += tokens - entry.tokens
                entry.tokens = tokens
            state.reserved_pico -= taken.cost_pico
            state.spent_pico += cost_pico

    def headers(self, key_id: int, limits: Limits) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            return _headers(self._state(key_id, now), limits, now)

    def usage(self, key_id: int) -> KeyUsage:
        """What the key holds now (for invariants and admin views)."""
        with self._lock:
            state = self._state(key_id, self._clock())
            return KeyUsage(len(state.window), state.window_tokens, len(state.open),
                            state.reserved_pico, state.spent_pico)

    def check_integrity(self) -> None:
        with self._lock:
            now = self._clock()
            for state in self._keys.values():
                _prune(state, now)
                times = [entry.ts for entry in state.window]
                assert times == sorted(times) and all(now - ts < WINDOW_S for ts in times)
                assert state.window_tokens == sum(entry.tokens for entry in state.window)
                assert all(entry.tokens >= 0 for entry in state.window)
                assert state.reserved_pico == sum(r.cost_pico for r, _ in state.open.values())
                assert state.reserved_pico >= 0 and state.spent_pico >= 0

    def _state(self, key_id: int, now: float) -> _KeyState:
        state = self._keys.setdefault(key_id, _KeyState())
        _prune(state, now)
        return state


def _prune(state: _KeyState, now: float) -> None:
    """Drop the requests admitted 60 s ago or more (the window is (now - 60 s, now])."""
    while state.window and now - state.window[0].ts >= WINDOW_S:
        state.window_tokens -= state.window.popleft().tokens


def _check_rate(state: _KeyState, limits: Limits, tokens: int, now: float) -> None:
    """Raise `RateLimited` unless one more request of `tokens` fits rpm and tpm now."""
    waits, reasons = [], []
    if limits.rpm is not None and len(state.window) >= limits.rpm:
        # the request that must leave the window for one more to fit
        waits.append(state.window[len(state.window) - limits.rpm].ts + WINDOW_S - now)
        reasons.append(f"requests per min (RPM): Limit {limits.rpm}, Used {len(state.window)}, "
                       "Requested 1")
    if limits.tpm is not None and tokens > limits.tpm:
        raise RateLimited(
            "rate_limit_exceeded",
            f"Request too large for tokens per min (TPM): Limit {limits.tpm}, Requested {tokens}. "
            "Send fewer prompt tokens or a smaller max_tokens.", None,
            _headers(state, limits, now))
    if limits.tpm is not None and state.window_tokens + tokens > limits.tpm:
        excess = state.window_tokens + tokens - limits.tpm
        for entry in state.window:  # the oldest requests whose leaving frees `excess` tokens
            excess -= entry.tokens
            if excess <= 0:
                waits.append(entry.ts + WINDOW_S - now)
                break
        reasons.append(f"tokens per min (TPM): Limit {limits.tpm}, Used {state.window_tokens}, "
                       f"Requested {tokens}")
    if waits:
        wait = max(waits)
        raise RateLimited(
            "rate_limit_exceeded",
            f"Rate limit reached for {' and '.join(reasons)}. "
            f"Please try again in {format_duration(wait)}.",
            max(1, math.ceil(wait - 1e-9)), _headers(state, limits, now))


def _headers(state: _KeyState, limits: Limits, now: float) -> dict[str, str]:
    """Reset: when the window is back to its full limit (the last request counting leaves it)."""
    headers = {}
    if limits.rpm is not None:
        last = state.window[-1].ts + WINDOW_S - now if state.window else 0.0
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - len(state.window)))
        headers["x-ratelimit-reset-requests"] = format_duration(last)
    if limits.tpm is not None:
        counting = [entry.ts for entry in state.window if entry.tokens]
        last = counting[-1] + WINDOW_S - now if counting else 0.0
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - state.window_tokens))
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


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")


def _usd(pico: int) -> str:
    """Picodollars as an exact USD string ("0.000012", "5")."""
    whole, frac = divmod(pico, 10**12)
    return f"{whole}.{frac:012d}".rstrip("0").rstrip(".") if frac else str(whole)
