"""Server settings (resolved once by the CLI) and the little mutable state the routes share:
the draining flag, what the generation requests in flight hold (admission control) and the
limiter as the routes call it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tokenmill.platform.keys import KeyService
from tokenmill.platform.ledger import Ledger
from tokenmill.platform.limits import (InProcessLimiter, KeyUsage, Limiter, LimiterUnavailable,
                                       Limits, Reservation)
from tokenmill.platform.spool import UsageSpool
from tokenmill.server.errors import APIError, rate_limited, unavailable
from tokenmill.server.store_outage import StoreOutage

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    keys: KeyService | None  # the platform's keys; None: auth disabled (--no-auth)
    ledger: Ledger | None = None  # one usage record per request made with a key
    spool: UsageSpool | None = None  # --ledger-fail-open: records wait here while the store is down
    # keys' rpm, tpm and budgets: this process's own, or a RedisLimiter the replicas share (--redis)
    limiter: Limiter = field(default_factory=InProcessLimiter)
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models `created`
    max_body_bytes: int = 4 << 20  # larger request bodies get a 413
    request_timeout_s: float = 600.0  # deadline of one generation request, from its arrival
    max_pending_sequences: int = 2048  # sequences (prompts x n) admitted and not finished
    max_pending_tokens: int = 1_000_000  # their tokens: prompts (bounded by bytes) + max_tokens
    max_key_share: float = 0.5  # of both, the most one key may hold (none for --no-auth)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may finish
    default_max_tokens: int = 512  # when the client sets none (clamped to what fits)

    def __post_init__(self) -> None:
        if not 0 < self.max_key_share <= 1:
            raise ValueError(f"max_key_share must be in (0, 1], not {self.max_key_share}")
        for name in ("max_pending_sequences", "max_pending_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class Demand:
    """What a generation request will hold while in flight, known before any tokenizing: its
    sequences (prompts x n) and an upper bound of their tokens (each sequence's prompt, bounded
    by its UTF-8 bytes plus the chat template's overhead, plus max_tokens)."""

    sequences: int
    tokens: int


class ServerState:
    """Admission of generation requests by what they cost: sequences and tokens, never HTTP
    requests (one /v1/completions call of 64 prompts with n=8 is 512 sequences). Checked on the
    event loop before tokenizing or rendering a template, so a refusal costs nothing:
    - a request larger than a key's share (below) is a 429 without Retry-After: waiting cannot
      help;
    - the whole server holds at most `max_pending_sequences` and `max_pending_tokens`: past that
      a 503 `server_overloaded` with Retry-After;
    - a key may hold at most `max_key_share` of either: past that, while the server has room for
      others, its request is a 429 with Retry-After, so one client fanning out cannot take the
      capacity from the others (with --no-auth there are no keys: the whole capacity is one
      share)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.draining = False  # set on SIGTERM: new generation requests get a 503
        self.limiter: Limiter = GuardedLimiter(settings.limiter)
        self.outage = StoreOutage(settings.spool)  # the store-down policy, logged once an outage
        self.in_flight = 0  # admitted generation requests not yet finished
        self.held = Demand(0, 0)  # what they hold together
        self._held_by_key: dict[int, Demand] = {}  # and per key (keys with nothing held absent)

    def admit(self, demand: Demand, key_id: int | None) -> Ticket:
        settings = self.settings
        if self.draining:
            raise unavailable("The server is shutting down; retry on another replica.",
                              "server_draining")
        capacity = Demand(settings.max_pending_sequences, settings.max_pending_tokens)
        share = capacity if key_id is None else Demand(
            max(1, int(capacity.sequences * settings.max_key_share)),
            max(1, int(capacity.tokens * settings.max_key_share)))
        if demand.sequences > share.sequences or demand.tokens > share.tokens:
            raise rate_limited("rate_limit_exceeded", (
                f"Request too large: it needs {demand.sequences} sequences (prompts x n) and up "
                f"to {demand.tokens} tokens; at most {share.sequences} sequences and "
                f"{share.tokens} tokens may be in flight for one key. Send fewer prompts, a "
                "smaller n or a smaller max_tokens."), {})
        if not _fits(self.held, demand, capacity):
            raise unavailable("The server is overloaded; retry shortly.", "server_overloaded")
        held_by_key = self._held_by_key.get(key_id, Demand(0, 0))
        if key_id is not None and not _fits(held_by_key, demand, share):
            raise rate_limited("rate_limit_exceeded", (
                f"Too much in flight for this key: {held_by_key.sequences} sequences and "
                f"{held_by_key.tokens} tokens, at most {share.sequences} and {share.tokens}. "
                "Retry when some of its requests have finished."), {"retry-after": "1"})
        self._hold(key_id, demand, +1)
        return Ticket(self, key_id, demand)

    def _hold(self, key_id: int | None, demand: Demand, sign: int) -> None:
        self.in_flight += sign
        self.held = _plus(self.held, demand, sign)
        if key_id is not None:
            left = _plus(self._held_by_key.get(key_id, Demand(0, 0)), demand, sign)
            if left.sequences or left.tokens:
                self._held_by_key[key_id] = left
            else:
                self._held_by_key.pop(key_id, None)


def _fits(held: Demand, demand: Demand, limit: Demand) -> bool:
    return (held.sequences + demand.sequences <= limit.sequences
            and held.tokens + demand.tokens <= limit.tokens)


def _plus(a: Demand, b: Demand, sign: int) -> Demand:
    return Demand(a.sequences + sign * b.sequences, a.tokens + sign * b.tokens)


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    def __init__(self, state: ServerState, key_id: int | None, demand: Demand):
        self._state: ServerState | None = state
        self._key_id = key_id
        self._demand = demand

    def release(self) -> None:
        if self._state is not None:
            self._state._hold(self._key_id, self._demand, -1)
            self._state = None


class GuardedLimiter(Limiter):
    """The limiter as the routes call it. While its backend is unreachable (Redis down:
    `LimiterUnavailable`) a request that needs admission gets a 503 `limiter_unavailable`, never
    a 500; a reservation that cannot be handed back stays held until the backend releases it as
    lost (the request is over and billed: its client must not see an error for it); responses
    go without x-ratelimit-* headers. The log says so once when an outage begins and once when
    it ends, not per request."""

    def __init__(self, backend: Limiter):
        self.backend = backend
        self._down = False
        self._lock = threading.Lock()  # called on the loop and worker threads alike

    def reserve(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                spent_pico: int) -> Reservation:
        try:
            return self._call(self.backend.reserve, key_id, limits, tokens, cost_pico,
                              spent_pico)
        except LimiterUnavailable:
            raise _refusal() from None

    def reserve_with_headers(self, key_id: int, limits: Limits, tokens: int, cost_pico: int,
                             spent_pico: int) -> tuple[Reservation, dict[str, str]]:
        try:
            return self._call(self.backend.reserve_with_headers, key_id, limits, tokens,
                              cost_pico, spent_pico)
        except LimiterUnavailable:
            raise _refusal() from None

    def finish(self, reservation: Reservation, tokens: int, cost_pico: int) -> None:
        try:
            self._call(self.backend.finish, reservation, tokens, cost_pico)
        except LimiterUnavailable:
            pass  # held until the backend releases it as lost

    def headers(self, key_id: int, limits: Limits) -> dict[str, str]:
        try:
            return self._call(self.backend.headers, key_id, limits)
        except LimiterUnavailable:
            return {}

    def usage(self, key_id: int) -> KeyUsage:
        try:
            return self._call(self.backend.usage, key_id)
        except LimiterUnavailable:
            raise _refusal() from None

    def _call(self, method: Callable[..., T], *args) -> T:
        """`method(*args)`, noting when the backend goes down and when it is back."""
        try:
            result = method(*args)
        except LimiterUnavailable as exc:
            self._note(down=True, cause=exc)
            raise
        self._note(down=False)
        return result

    def _note(self, down: bool, cause: Exception | None = None) -> None:
        with self._lock:
            if down == self._down:
                return
            self._down = down
        if down:
            log.error("the rate limiter is unreachable, refusing requests: %s", cause)
        else:
            log.info("the rate limiter is reachable again")


def _refusal() -> APIError:
    return unavailable("The rate limiter is unavailable; retry shortly.", "limiter_unavailable")
