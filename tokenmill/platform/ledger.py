"""The usage ledger: exactly one record per request, whose id is the response's id.

`record` is idempotent on that id (insert-or-nothing in one statement, on SQLite and
PostgreSQL alike), so a retry after a timeout or a second writer on the same request can never
bill twice. The server writes the record before the last byte of a response leaves (the JSON
body, or a stream's `[DONE]`): a response a client received is in the ledger, whatever happens to
the process afterwards. A request still running when the process dies has no record (its tokens
are not billed). Like the rest of the store, nothing here may run on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Date, cast, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tokenmill.platform.db import UsageRecord
from tokenmill.platform.store import Store

STATUSES = ("completed", "aborted", "error")
MAX_PAGE = 1000  # records in one page of a usage query


@dataclass(frozen=True)
class UsageEntry:
    id: str  # the response's id (chatcmpl-..., cmpl-...)
    key_id: int  # the key that made the request
    model: str  # the served model id
    prompt_tokens: int
    cached_tokens: int  # of prompt_tokens, served by the prefix cache
    completion_tokens: int  # generated, whether the client read them or not
    cost_pico: int  # exact, picodollars (1e-12 USD)
    status: str  # completed | aborted (the client left, or a deadline) | error
    finish_reason: str | None  # the last choice's, when it finished
    created_at: datetime  # request arrival, UTC
    finished_at: datetime  # when the record was made, UTC


@dataclass(frozen=True)
class UsageTotals:
    """Picodollars over a selection, grouped three ways (keys by id, days as YYYY-MM-DD UTC)."""

    by_key: dict[int, int]
    by_model: dict[str, int]
    by_day: dict[str, int]


@dataclass(frozen=True)
class UsageGroup:
    """What one key spent on one model in one UTC day, summed by the database."""

    day: str  # YYYY-MM-DD, UTC
    key_id: int
    model: str
    requests: int  # records, whatever their status
    prompt_tokens: int
    cached_tokens: int  # of prompt_tokens
    completion_tokens: int
    cost_pico: int


@dataclass(frozen=True)
class UsagePage:
    data: list[UsageEntry]  # oldest first
    total_cost_pico: int  # over the whole selection, not only this page
    has_more: bool  # records after the last one of `data`


class Ledger:
    def __init__(self, store: Store):
        self.store = store

    def record(self, entry: UsageEntry) -> bool:
        """Write `entry` unless a record with its id exists; True if this call wrote it."""
        if entry.status not in STATUSES:
            raise ValueError(f"status {entry.status!r} is not one of {', '.join(STATUSES)}")
        values = {name: getattr(entry, name) for name in UsageEntry.__dataclass_fields__}
        dialect = self.store.engine.dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = insert(UsageRecord).values(**values).on_conflict_do_nothing(
            index_elements=["id"]).returning(UsageRecord.id)  # a row back: this call wrote it
        with self.store.write() as session:
            return session.execute(statement).first() is not None

    def query(self, key_id: int | None = None, *, start: datetime | None = None,
              end: datetime | None = None, model: str | None = None, limit: int = 100,
              after: str | None = None) -> UsagePage:
        """Records of `key_id` (None: every key) created in [start, end), of `model` if given,
        in creation order (ties by id), `limit` of them after the record `after`."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        where = _filters(key_id, start, end, model)
        order = (UsageRecord.created_at, UsageRecord.id)
        with self.store.read() as session:
            total = session.scalar(select(func.coalesce(func.sum(UsageRecord.cost_pico), 0))
                                   .where(*where))
            page = select(UsageRecord).where(*where)
            if after is not None:
                cursor = session.get(UsageRecord, after)
                if cursor is None or (key_id is not None and cursor.key_id != key_id):
                    raise KeyError(after)  # never a cursor into another key's records
                page = page.where((UsageRecord.created_at > cursor.created_at)
                                  | ((UsageRecord.created_at == cursor.created_at)
                                     & (UsageRecord.id > cursor.id)))
            rows = session.scalars(page.order_by(*order).limit(limit + 1)).all()
        entries = [_entry(row) for row in rows[:limit]]
        return UsagePage(entries, int(total), len(rows) > limit)

    def totals(self, *, start: datetime | None = None, end: datetime | None = None,
               model: str | None = None, key_id: int | None = None) -> UsageTotals:
        """Costs of the records created in [start, end) (of `model`, of `key_id` if given), per
        key, per model and per UTC day, summed by the database."""
        where = _filters(key_id, start, end, model)
        cost = func.sum(UsageRecord.cost_pico)
        day = self._day()
        with self.store.read() as session:
            def grouped(column) -> dict:
                rows = session.execute(select(column, cost).where(*where).group_by(column)
                                       .order_by(column))
                return {value: int(total) for value, total in rows}

            by_key, by_model, by_day = (grouped(UsageRecord.key_id),
                                        grouped(UsageRecord.model), grouped(day))
        return UsageTotals(by_key, by_model, {str(d): v for d, v in by_day.items()})

    def daily(self, key_id: int | None = None, *, start: datetime | None = None,
              end: datetime | None = None) -> list[UsageGroup]:
        """Requests, tokens and cost of the records created in [start, end) (of `key_id` if
        given) per UTC day, key and model, ordered so."""
        day = self._day()
        columns = (day, UsageRecord.key_id, UsageRecord.model)
        sums = [func.count()] + [func.sum(c) for c in (
            UsageRecord.prompt_tokens, UsageRecord.cached_tokens, UsageRecord.completion_tokens,
            UsageRecord.cost_pico)]
        statement = (select(*columns, *sums).where(*_filters(key_id, start, end, None))
                     .group_by(*columns).order_by(*columns))
        with self.store.read() as session:
            rows = session.execute(statement).all()
        return [UsageGroup(str(d), k, m, *(int(v) for v in values))
                for d, k, m, *values in rows]

    def recent(self, key_id: int | None = None, limit: int = 20) -> list[UsageEntry]:
        """The `limit` newest records (of `key_id` if given), newest first."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        statement = (select(UsageRecord).where(*_filters(key_id, None, None, None))
                     .order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc()).limit(limit))
        with self.store.read() as session:
            return [_entry(row) for row in session.scalars(statement)]

    def _day(self):
        """The UTC day of a record's creation, as the database computes it."""
        if self.store.engine.dialect.name == "postgresql":
            return cast(func.timezone("UTC", UsageRecord.created_at), Date)
        return func.date(UsageRecord.created_at)  # SQLite holds naive UTC text

    def spend(self, key_id: int) -> int:
        """Everything `key_id` was billed, picodollars."""
        with self.store.read() as session:
            return int(session.scalar(select(func.coalesce(func.sum(UsageRecord.cost_pico), 0))
                                      .where(UsageRecord.key_id == key_id)))


def _filters(key_id: int | None, start: datetime | None, end: datetime | None,
             model: str | None) -> list:
    """WHERE clauses of a selection: its key, [start, end) and model, each when given."""
    where = []
    if key_id is not None:
        where.append(UsageRecord.key_id == key_id)
    if start is not None:
        where.append(UsageRecord.created_at >= start)
    if end is not None:
        where.append(UsageRecord.created_at < end)
    if model is not None:
        where.append(UsageRecord.model == model)
    return where


def _entry(row: UsageRecord) -> UsageEntry:
    return UsageEntry(**{name: getattr(row, name) for name in UsageEntry.__dataclass_fields__})
