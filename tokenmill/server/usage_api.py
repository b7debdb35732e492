"""GET /v1/usage: the calling key's own usage records and their total cost, from the ledger.

Filters: `start` and `end` (unix seconds or ISO 8601; records created in [start, end)),
`model`; pagination: `limit` (default 100, at most 1000) and `after` (the last id of the previous
page). Money shows as USD numbers computed from exact picodollars.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from tokenmill.catalog.pricing import pico_to_usd
from tokenmill.platform.ledger import MAX_PAGE, Ledger, UsageEntry, UsagePage
from tokenmill.platform.store import StoreUnavailable
from tokenmill.server.errors import invalid_request, unavailable
from tokenmill.server.protocol import UsageList, UsageRecordOut


def parse_time(value: str | None, param: str) -> datetime | None:
    """Unix seconds or an ISO 8601 date/time (UTC unless it says otherwise), or a 400."""
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(float(value), timezone.utc)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise invalid_request(f"{param} must be unix seconds or an ISO 8601 time, not {value!r}",
                              param, "invalid_value") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


async def usage_page(ledger: Ledger, key_id: int | None, *, since: datetime | None,
                     until: datetime | None, model: str | None, limit: int,
                     after: str | None) -> UsagePage:
    """One page of the ledger's records (`key_id` None: every key), off the event loop; a bad
    limit or cursor is a 400, an unreachable store a 503. Shared by /v1/usage and /admin/usage."""
    if not 1 <= limit <= MAX_PAGE:
        raise invalid_request(f"limit must be between 1 and {MAX_PAGE}", "limit",
                              "invalid_value")
    try:
        return await asyncio.to_thread(ledger.query, key_id, start=since, end=until,
                                       model=model, limit=limit, after=after)
    except KeyError:
        raise invalid_request(f"after={after!r} is not a usage record of this selection",
                              "after", "invalid_value") from None
    except StoreUnavailable:
        raise unavailable("The usage ledger is unavailable; retry shortly.",
                          "store_unavailable") from None


async def usage_of(ledger: Ledger | None, key_id: int | None, *, start: str | None,
                   end: str | None, model: str | None, limit: int,
                   after: str | None) -> UsageList:
    if ledger is None or key_id is None:
        raise invalid_request("Usage is recorded per API key; this server runs without keys "
                              "(--no-auth).", None, "usage_not_recorded")
    page = await usage_page(ledger, key_id, since=parse_time(start, "start"),
                            until=parse_time(end, "end"), model=model, limit=limit,
                            after=after)
    return UsageList(data=[record_out(e) for e in page.data],
                     total_cost=pico_to_usd(page.total_cost_pico), has_more=page.has_more)


def record_out(entry: UsageEntry, key: str | None = None) -> UsageRecordOut:
    """One record as the API shows it; `key` (the key's name) on admin views."""
    extra = {} if key is None else {"key": key}
    return UsageRecordOut(id=entry.id, model=entry.model, **extra,
                          created=int(entry.created_at.timestamp()),
                          prompt_tokens=entry.prompt_tokens, cached_tokens=entry.cached_tokens,
                          completion_tokens=entry.completion_tokens,
                          cost=pico_to_usd(entry.cost_pico), status=entry.status,
                          finish_reason=entry.finish_reason)
