"""GET /v1/usage: the calling key's own usage records and their total cost, from the ledger;
GET /v1/usage/summary: its limits, spend and usage per day and model (the usage dashboard's
data); and how keys and records show in the API (the admin routes show them alike).

Filters: `start` and `end` (unix seconds or ISO 8601; records created in [start, end)),
`model`; pagination: `limit` (default 100, at most 1000) and `after` (the last id of the previous
page). Money shows as USD numbers computed from exact picodollars, times as unix seconds.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

from tokenmill.catalog.pricing import pico_to_usd
from tokenmill.platform.keys import KeyInfo, KeyService
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
        # In UTC here, where a time too close to year 1 or 9999 to convert is still a 400.
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(
            timezone.utc)
    except (ValueError, OverflowError):
        raise invalid_request(f"{param} must be unix seconds or an ISO 8601 time, not {value!r}",
                              param, "invalid_value") from None


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


SUMMARY_DAYS = 30  # what a summary covers when `start` is not given: today and 29 days before
RECENT = 20  # the newest records a summary lists


async def usage_summary(keys: KeyService | None, ledger: Ledger | None, key_id: int | None, *,
                        start: str | None, end: str | None) -> dict[str, Any]:
    """Key `key_id`'s limits and spend (None: every key's), its usage per UTC day and model in
    [start, end) (default: the last SUMMARY_DAYS days) and its RECENT newest records (named by
    key), for the usage dashboard."""
    if keys is None or ledger is None:
        raise invalid_request("Usage is recorded per API key; this server runs without keys "
                              "(--no-auth).", None, "usage_not_recorded")
    since = parse_time(start, "start")
    if since is None:
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        since = today - timedelta(days=SUMMARY_DAYS - 1)
    until = parse_time(end, "end")

    def read():
        infos, names = keys.list(), keys.ids_by_name()
        if key_id is not None:  # by id: a key renamed or removed since it was checked is absent
            infos = [info for info in infos if names.get(info.name) == key_id]
        return (infos, {v: k for k, v in names.items()},
                ledger.daily(key_id, start=since, end=until), ledger.recent(key_id, RECENT))

    try:
        infos, id_names, days, recent = await asyncio.to_thread(read)
    except StoreUnavailable:
        raise unavailable("The usage ledger is unavailable; retry shortly.",
                          "store_unavailable") from None
    return {"object": "usage.summary", "start": int(since.timestamp()),
            "end": None if until is None else int(until.timestamp()),
            "keys": [key_out(info) for info in infos],
            "days": [{"date": g.day, "key": id_names.get(g.key_id, str(g.key_id)),
                      "model": g.model, "requests": g.requests,
                      "prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens,
                      "completion_tokens": g.completion_tokens, "cost": pico_to_usd(g.cost_pico)}
                     for g in days],
            "total_cost": pico_to_usd(sum(g.cost_pico for g in days)),
            "recent": [record_out(e, id_names.get(e.key_id, str(e.key_id))) for e in recent]}


def key_out(info: KeyInfo) -> dict[str, Any]:
    """A key as the API shows it: never the key, money in USD (`remaining_budget`: what its
    budget leaves, none below 0; None without a budget)."""
    def when(value: datetime | None) -> int | None:
        return None if value is None else int(value.timestamp())

    budget = info.budget_pico
    return {"name": info.name, "display": info.display, "admin": info.admin, "rpm": info.rpm,
            "tpm": info.tpm, "models": None if info.models is None else list(info.models),
            "budget": None if budget is None else pico_to_usd(budget),
            "spend": pico_to_usd(info.spend_pico),
            "remaining_budget": None if budget is None else
            pico_to_usd(max(0, budget - info.spend_pico)),
            "status": info.status, "expires_at": when(info.expires_at),
            "created": when(info.created_at), "last_used_at": when(info.last_used_at)}


def record_out(entry: UsageEntry, key: str | None = None) -> UsageRecordOut:
    """One record as the API shows it; `key` (the key's name) on admin views."""
    extra = {} if key is None else {"key": key}
    return UsageRecordOut(id=entry.id, model=entry.model, **extra,
                          created=int(entry.created_at.timestamp()),
                          prompt_tokens=entry.prompt_tokens, cached_tokens=entry.cached_tokens,
                          completion_tokens=entry.completion_tokens,
                          cost=pico_to_usd(entry.cost_pico), status=entry.status,
                          finish_reason=entry.finish_reason)
