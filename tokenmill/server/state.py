"""Server settings (resolved once by the CLI) and the little mutable state the routes share:
the draining flag and the count of generation requests in flight (admission control).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.platform.keys import KeyService
from tokenmill.platform.ledger import Ledger
from tokenmill.platform.limits import InProcessLimiter, Limiter
from tokenmill.platform.spool import UsageSpool
from tokenmill.server.errors import unavailable
from tokenmill.server.store_outage import StoreOutage


@dataclass(frozen=True)
class ServerSettings:
    keys: KeyService | None  # the platform's keys; None: auth disabled (--no-auth)
    ledger: Ledger | None = None  # one usage record per request made with a key
    spool: UsageSpool | None = None  # --ledger-fail-open: records wait here while the store is down
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models `created`
    max_body_bytes: int = 4 << 20  # larger request bodies get a 413
    request_timeout_s: float = 600.0  # server-side deadline of one generation request
    max_pending_requests: int = 512  # generation requests in flight before new ones get a 503
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may finish
    default_max_tokens: int = 512  # when the client sets none (clamped to what fits)


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.draining = False  # set on SIGTERM: new generation requests get a 503
        self.limiter: Limiter = InProcessLimiter()  # this process's rpm, tpm and budgets
        self.outage = StoreOutage(settings.spool)  # the store-down policy, logged once an outage
        self.in_flight = 0  # admitted generation requests not yet finished

    def admit(self) -> Ticket:
        if self.draining:
            raise unavailable("The server is shutting down; retry on another replica.",
                              "server_draining")
        if self.in_flight >= self.settings.max_pending_requests:
            raise unavailable("The server is overloaded; retry shortly.", "server_overloaded")
        self.in_flight += 1
        return Ticket(self)


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    def __init__(self, state: ServerState):
        self._state: ServerState | None = state

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state = None
