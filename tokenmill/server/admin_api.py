"""/admin/: keys (list, create, change limits, revoke) and every key's usage, for admin keys only.

A key that is not an admin key gets a 403 `permission_denied`; without keys (`--no-auth`) there
is nothing to administer and every route is a 400. Store work runs in worker threads.
"""

from __future__ import annotations

import asyncio
from datetime import date

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from tokenmill.catalog.pricing import pico_to_usd
from tokenmill.platform.keys import UNSET
from tokenmill.platform.store import StoreUnavailable
from tokenmill.server.errors import invalid_request, not_found, permission_denied, unavailable
from tokenmill.server.state import ServerSettings
from tokenmill.server.usage_api import (key_out, parse_time, record_out, usage_page,
                                        usage_summary)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    rpm: int | None = None
    tpm: int | None = None
    budget: str | float | None = None  # USD
    models: list[str] | None = None
    expires: date | None = None  # the key stops working at 00:00 UTC that day
    admin: bool = False


class KeyChange(BaseModel):
    """Only the fields present change; null removes that limit."""

    model_config = ConfigDict(extra="forbid")
    rpm: int | None = None
    tpm: int | None = None
    budget: str | float | None = None
    models: list[str] | None = None


def admin_router(settings: ServerSettings) -> APIRouter:
    def require_admin(request: Request) -> None:
        """Before the body is even validated: keys on, and an admin key made the request."""
        if settings.keys is None or settings.ledger is None:
            raise invalid_request("This server runs without API keys (--no-auth): there is "
                                  "nothing to administer.", None, "admin_unavailable")
        principal = getattr(request.state, "principal", None)
        if principal is None or not principal.admin:
            raise permission_denied("This route needs an admin API key.")

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

    async def run(call, *args, **kwargs):
        """`call` in a worker thread; its refusals as OpenAI errors."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except KeyError as exc:
            raise not_found(str(exc.args[0]) if exc.args else "not found") from None
        except ValueError as exc:
            raise invalid_request(str(exc), None, "invalid_value") from None
        except StoreUnavailable:
            raise unavailable("The key store is unavailable; retry shortly.",
                              "store_unavailable") from None

    @router.get("/keys")
    async def list_keys():
        keys = settings.keys
        return {"object": "list", "data": [key_out(i) for i in await run(keys.list)]}

    @router.post("/keys")
    async def create_key(body: KeyCreate):
        keys = settings.keys
        key, info = await run(keys.create, body.name, rpm=body.rpm, tpm=body.tpm,
                              budget_usd=_usd(body.budget), models=body.models,
                              expires=body.expires, admin=body.admin)
        return {"key": key, **key_out(info)}  # the only time the key is shown

    @router.patch("/keys/{name}")
    async def change_key(name: str, body: KeyChange):
        keys = settings.keys
        given = body.model_fields_set
        changes = {field: getattr(body, field) if field in given else UNSET
                   for field in ("rpm", "tpm", "models")}
        changes["budget_usd"] = _usd(body.budget) if "budget" in given else UNSET
        return key_out(await run(keys.update, name, **changes))

    @router.delete("/keys/{name}")
    async def revoke_key(name: str):
        keys = settings.keys
        return key_out(await run(keys.revoke, name))

    @router.get("/usage")
    async def all_usage(start: str | None = None, end: str | None = None,
                        model: str | None = None, key: str | None = None, limit: int = 100,
                        after: str | None = None):
        keys, ledger = settings.keys, settings.ledger
        ids = await run(keys.ids_by_name)
        if key is not None and key not in ids:
            raise not_found(f"no key named {key!r}", "key")
        key_id = None if key is None else ids[key]
        since, until = parse_time(start, "start"), parse_time(end, "end")
        page = await usage_page(ledger, key_id, since=since, until=until, model=model,
                                limit=limit, after=after)
        totals = await run(ledger.totals, start=since, end=until, model=model, key_id=key_id)
        id_names = {v: k for k, v in ids.items()}
        return {"object": "list", "data": [record_out(e, id_names.get(e.key_id))
                                           for e in page.data],
                "has_more": page.has_more, "total_cost": pico_to_usd(page.total_cost_pico),
                "by_key": {id_names.get(k, str(k)): pico_to_usd(v)
                           for k, v in totals.by_key.items()},
                "by_model": {m: pico_to_usd(v) for m, v in totals.by_model.items()},
                "by_day": {d: pico_to_usd(v) for d, v in totals.by_day.items()}}

    @router.get("/usage/summary")
    async def all_usage_summary(start: str | None = None, end: str | None = None):
        """/v1/usage/summary over every key: each key's limits and spend, and every key's days."""
        return await usage_summary(settings.keys, settings.ledger, None, start=start, end=end)

    return router


def _usd(value: str | float | None) -> str | None:
    """A USD amount as the exact decimal text it was sent as (floats through repr)."""
    return None if value is None else str(value)
