"""What the server does while its store (keys, usage) cannot be reached.

Fail closed (the default): a request that needs the store gets a 503 `store_unavailable`. Fail
open (`--ledger-fail-open`): requests go on where they safely can. A key this process
authenticated before the outage keeps working with the principal it had then (a revocation made
during the outage is seen once the store is back); a key it never saw is still refused (503), as
there is nothing to check it against. A budget is checked against the spend the limiter knows.
Usage records go to the spool (platform/spool.py) and into the ledger once the store is back.

Either way the log says so once when an outage begins and once when it ends, not per request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from tokenmill.platform.keys import Principal
from tokenmill.platform.spool import UsageSpool
from tokenmill.server.errors import APIError, unavailable

log = logging.getLogger(__name__)

KNOWN_PRINCIPALS = 10_000  # keys remembered for fail-open auth, least recently used dropped


class StoreOutage:
    def __init__(self, spool: UsageSpool | None):
        self.spool = spool  # set: fail open, records wait here; None: fail closed
        self._down = False
        self._lock = threading.Lock()  # `failed`/`reachable` run on the loop and worker threads
        self._known: OrderedDict[str, Principal] = OrderedDict()  # key hash -> last principal

    @property
    def fail_open(self) -> bool:
        return self.spool is not None

    def failed(self, error: Exception, what: str) -> APIError:
        """Note that the store failed (logged once per outage); the 503 to answer when failing
        closed."""
        with self._lock:
            if not self._down:
                self._down = True
                policy = ("serving on, usage records spooled to "
                          f"{self.spool.path}" if self.spool else "refusing requests")
                log.error("the store is unreachable, %s: %s", policy, error)
        return unavailable(f"The {what} is unavailable; retry shortly.", "store_unavailable")

    def reachable(self) -> None:
        with self._lock:
            if self._down:
                self._down = False
                log.info("the store is reachable again")

    def remember(self, key_hash: str, principal: Principal) -> None:
        """A key authenticated by the store: what fail-open auth may use while it is down."""
        if self.spool is None:
            return
        with self._lock:
            self._known[key_hash] = principal
            self._known.move_to_end(key_hash)
            while len(self._known) > KNOWN_PRINCIPALS:
                self._known.popitem(last=False)

    def known(self, key_hash: str) -> Principal | None:
        with self._lock:
            return self._known.get(key_hash)
