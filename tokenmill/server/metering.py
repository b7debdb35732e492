"""Metering: a request's admission against its key's limits, and its one usage record.

`reserve` admits a generation request against the key's rpm, tpm and budget before it reaches
the engine; `bill` writes the request's one ledger record (completed, aborted or error) before its
last byte leaves and hands the reservation back with the true counts. While the store is down,
a server failing closed answers 503 and one failing open spools the records
(server/store_outage.py). Requests made without a key
(`--no-auth`) are neither limited nor recorded. Store work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from starlette.requests import Request

from tokenmill.platform.ledger import UsageEntry
from tokenmill.platform.limits import RateLimited
from tokenmill.platform.store import StoreUnavailable
from tokenmill.server.errors import APIError, rate_limited
from tokenmill.server.state import ServerSettings, ServerState
from tokenmill.server.usage import UsageTally

if TYPE_CHECKING:
    from tokenmill.server.serving import Job

log = logging.getLogger(__name__)


class Metering:
    def __init__(self, settings: ServerSettings, state: ServerState):
        self.settings = settings
        self.state = state

    async def reserve(self, job: Job, raw: Request) -> dict[str, str]:
        """Admit the request against its key's rpm, tpm and budget (a 429 otherwise), reserving
        prompt + n x max_tokens tokens and the most they can cost; the reservation is kept on
        `raw.state` for `bill` to hand back. Returns the x-ratelimit headers."""
        principal = getattr(raw.state, "principal", None)
        if principal is None or self.settings.ledger is None:
            return {}
        limits = principal.limits
        prompt = sum(len(ids) for ids in job.prompts)
        completion = len(job.prompts) * job.params.n * job.params.max_tokens
        most = job.model.entry.price.cost_pico(prompt, 0, completion)
        spent = 0  # failing open through an outage: the limiter's own figure counts
        if limits.budget_pico is not None:
            try:
                spent = await asyncio.to_thread(self.settings.ledger.spend, principal.key_id)
            except StoreUnavailable as exc:
                refusal = self.state.outage.failed(exc, "usage ledger")
                if not self.state.outage.fail_open:
                    raise refusal from None
        limiter = self.state.limiter

        def admit() -> dict[str, str]:  # in a worker thread: a Redis limiter is a round trip
            raw.state.reservation, headers = limiter.reserve_with_headers(
                principal.key_id, limits, prompt + completion, most, spent)
            return headers

        try:
            return await asyncio.to_thread(admit)
        except RateLimited as exc:
            raise rate_limited(exc.code, exc.message, exc.headers) from None

    async def bill(self, job: Job, request_id: str, raw: Request, tally: UsageTally, status: str,
                   finish_reason: str | None, timing: dict) -> None:
        """Write the request's one usage record (when a key made it and the ledger is on), in a
        worker thread; shielded, so a request cancelled meanwhile is billed all the same. A
        store that cannot take it is a 503 unless the server fails open."""
        principal = getattr(raw.state, "principal", None)
        if self.settings.ledger is None or principal is None:
            return
        raw.state.billing = True  # from here on, `bill` hands the reservation back
        prompt, cached, completion = tally.counts()
        entry = UsageEntry(id=request_id, key_id=principal.key_id, model=job.model.id,
                           prompt_tokens=prompt, cached_tokens=cached,
                           completion_tokens=completion,
                           cost_pico=tally.cost_pico(job.model.entry.price), status=status,
                           finish_reason=finish_reason, created_at=timing["arrival"],
                           finished_at=datetime.now(timezone.utc))
        try:
            await asyncio.shield(asyncio.to_thread(self._write, entry))
        finally:  # the reservation goes back once, with the true counts
            reservation = getattr(raw.state, "reservation", None)
            if reservation is not None:  # shielded as the write: it must happen
                await asyncio.shield(asyncio.to_thread(
                    self.state.limiter.finish, reservation, prompt + completion, entry.cost_pico))

    def _write(self, entry: UsageEntry) -> None:
        """In a worker thread: `entry` into the ledger, or into the spool when the store is down
        and the server fails open (a 503 when it fails closed). Once the store takes a record
        again, what the spool holds follows it."""
        outage, spool, ledger = self.state.outage, self.settings.spool, self.settings.ledger
        try:
            ledger.record(entry)
        except StoreUnavailable as exc:
            refusal = outage.failed(exc, "usage ledger")
            if spool is None:
                log.error("%s: usage record not written, the store is unavailable", entry.id)
                raise refusal from None
            spool.append(entry)
            return
        outage.reachable()
        if spool is not None and spool.pending():
            try:
                spool.replay(ledger)
            except StoreUnavailable:
                pass  # still spooled; the next record written tries again

    async def release_unbilled(self, raw: Request) -> None:
        """A stream whose client left before its body started never reaches `bill`: give its
        reservation back unused (nothing was generated, nothing is billed). In a worker thread,
        shielded as `bill`'s hand-back: it happens even if the response is being cancelled."""
        reservation = getattr(raw.state, "reservation", None)
        if reservation is not None and not getattr(raw.state, "billing", False):
            await asyncio.shield(asyncio.to_thread(self.state.limiter.finish, reservation, 0, 0))

    async def bill_quietly(self, *args) -> None:
        """`bill` on a path that is already failing or ending: a store error is logged, never
        raised over the original outcome."""
        try:
            await self.bill(*args)
        except APIError:
            pass

