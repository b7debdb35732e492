"""API keys in the store: create, list, update, revoke, and resolve a presented key to a principal.

A key is `sk-tm-` + 256 random bits (urlsafe base64); the store keeps only its sha256 and a display
form. `authenticate` looks the hash up with one indexed query on every call, with no cache, so a
revoked, expired or deleted key is refused on its very next request, in every server process.
All methods block on the database (see `tokenmill.platform.store`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from tokenmill.catalog.pricing import PICO
from tokenmill.platform.db import ApiKey, UsageRecord
from tokenmill.platform.limits import Limits
from tokenmill.platform.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-tm-"
MAX_STORED = 2**63 - 1  # the largest limit or budget (picodollars) a BIGINT column holds
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most this often
UNSET = object()  # `update`: leave this field as it is (None removes a limit)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_key(key: str) -> str:
    return f"{key[:len(KEY_PREFIX) + 4]}...{key[-4:]}"


@dataclass(frozen=True)
class Principal:
    """Who a request is from and what it may do; resolved afresh for every request."""

    key_id: int  # api_keys.id
    name: str  # the key's name
    display: str  # sk-tm-abcd...wxyz, safe to log
    admin: bool  # may use /admin/
    rpm: int | None  # requests per minute; None: unlimited
    tpm: int | None  # tokens per minute; None: unlimited
    budget_pico: int | None  # spend cap in picodollars; None: unlimited
    models: tuple[str, ...] | None  # allowed model ids; None: all
    expires_at: datetime | None  # refused from then on (UTC)

    @property
    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.budget_pico)


@dataclass(frozen=True)
class KeyInfo:
    """A key as `tokenmill keys list` and /admin/keys show it (never the key itself)."""

    name: str  # the key's name
    display: str  # sk-tm-abcd...wxyz
    admin: bool  # may use /admin/
    rpm: int | None  # requests per minute; None: unlimited
    tpm: int | None  # tokens per minute; None: unlimited
    budget_pico: int | None  # spend cap in picodollars; None: unlimited
    models: tuple[str, ...] | None  # allowed model ids; None: all
    spend_pico: int  # sum of the key's usage records' cost
    status: str  # active | revoked | expired
    expires_at: datetime | None  # UTC
    created_at: datetime  # UTC
    last_used_at: datetime | None  # UTC, to the minute


def budget_to_pico(budget_usd: Decimal | str | None) -> int | None:
    """USD (read through Decimal, exactly the digits given) as picodollars; finer than one
    picodollar or negative is a ValueError, never a rounding."""
    if budget_usd is None:
        return None
    try:
        usd = Decimal(str(budget_usd))
        pico = usd * PICO
    except InvalidOperation:
        raise ValueError(f"budget must be a USD amount such as 5 or 0.25, not {budget_usd!r}")
    if not pico.is_finite() or pico < 0 or pico != pico.to_integral_value():
        raise ValueError(f"budget must be a non-negative USD amount with at most 12 decimals, "
                         f"not {budget_usd!r}")
    if pico > MAX_STORED:
        raise ValueError(f"budget must be at most USD {Decimal(MAX_STORED) / PICO}, not "
                         f"{budget_usd!r}")
    return int(pico)


def expiry(expires: datetime | date | None) -> datetime | None:
    """An expiry time in UTC; a date means 00:00 UTC on that day (the key stops working as the
    day starts); a naive datetime is a ValueError."""
    if expires is None or isinstance(expires, datetime):
        if expires is not None and expires.tzinfo is None:
            raise ValueError(f"expiry {expires.isoformat()} has no time zone")
        return None if expires is None else expires.astimezone(timezone.utc)
    return datetime(expires.year, expires.month, expires.day, tzinfo=timezone.utc)


class KeyService:
    """The keys of one store. `clock` returns the current aware UTC time (tests move it)."""

    def __init__(self, store: Store, clock: Callable[[], datetime] | None = None):
        self.store = store
        self.clock = clock or (lambda: datetime.now(timezone.utc))

    def create(self, name: str, *, rpm: int | None = None, tpm: int | None = None,
               budget_usd: Decimal | str | None = None, models: list[str] | None = None,
               expires: datetime | date | None = None,
               admin: bool = False) -> tuple[str, KeyInfo]:
        """A new key named `name` (unique: a taken name is a ValueError); returns the key, the
        only time it exists in clear, and its info."""
        if not name or not name.strip():
            raise ValueError("a key needs a non-empty name")
        now = self.clock()
        expires_at = expiry(expires)
        if expires_at is not None and expires_at <= now:
            raise ValueError(f"expiry {expires_at.isoformat()} is already past")
        key = generate_key()
        row = ApiKey(name=name, key_hash=hash_key(key), display=display_key(key), admin=admin,
                     rpm=_limit("rpm", rpm), tpm=_limit("tpm", tpm),
                     budget_pico=budget_to_pico(budget_usd), models=_models(models),
                     expires_at=expires_at, created_at=now)
        try:
            with self.store.write() as session:
                if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
                    raise ValueError(f"a key named {name!r} already exists")
                session.add(row)
        except IntegrityError:  # a concurrent create of the same name won the race
            raise ValueError(f"a key named {name!r} already exists") from None
        return key, self._info(row, 0, now)

    def list(self) -> list[KeyInfo]:
        """Every key, oldest first, with its spend so far."""
        spend = func.coalesce(func.sum(UsageRecord.cost_pico), 0)
        query = (select(ApiKey, spend).outerjoin(UsageRecord, UsageRecord.key_id == ApiKey.id)
                 .group_by(ApiKey.id).order_by(ApiKey.created_at, ApiKey.id))
        now = self.clock()
        with self.store.read() as session:
            return [self._info(row, int(total), now) for row, total in session.execute(query)]

    def ids_by_name(self) -> dict[str, int]:
        """Every key's name -> its id (the ledger's `key_id`)."""
        with self.store.read() as session:
            rows = session.execute(select(ApiKey.name, ApiKey.id))
            return {name: key_id for name, key_id in rows}

    def get(self, name: str) -> KeyInfo:
        """The key named `name` with its spend; KeyError if there is none."""
        for info in self.list():
            if info.name == name:
                return info
        raise KeyError(f"no key named {name!r}")

    def revoke(self, name: str) -> KeyInfo:
        """Refuse the key from its next request on; revoking twice keeps the first time."""
        with self.store.write() as session:
            row = self._named(session, name)
            if row.revoked_at is None:
                row.revoked_at = self.clock()
        return self.get(name)

    def update(self, name: str, *, rpm=UNSET, tpm=UNSET, budget_usd=UNSET,
               models=UNSET) -> KeyInfo:
        """Change the given limits (None removes one); fields not given stay as they are."""
        changes = {}
        if rpm is not UNSET:
            changes["rpm"] = _limit("rpm", rpm)
        if tpm is not UNSET:
            changes["tpm"] = _limit("tpm", tpm)
        if budget_usd is not UNSET:
            changes["budget_pico"] = budget_to_pico(budget_usd)
        if models is not UNSET:
            changes["models"] = _models(models)
        with self.store.write() as session:
            row = self._named(session, name)
            for field, value in changes.items():
                setattr(row, field, value)
        return self.get(name)

    def authenticate(self, key: str) -> Principal | None:
        """The principal of an active key, or None for an unknown, revoked or expired one. One
        indexed read by hash; `last_used_at` is written only when a minute old or more."""
        key_hash = hash_key(key)
        with self.store.read() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
        now = self.clock()
        if row is None or _status(row, now) != "active":
            return None
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            stale = or_(ApiKey.last_used_at.is_(None),
                        ApiKey.last_used_at <= now - LAST_USED_RESOLUTION)
            try:
                with self.store.write() as session:
                    session.execute(update(ApiKey).where(ApiKey.id == row.id, stale)
                                    .values(last_used_at=now))
            except StoreUnavailable:
                pass  # advisory: a store that reads but cannot write still vouches for the key
        return Principal(row.id, row.name, row.display, row.admin, row.rpm, row.tpm,
                         row.budget_pico, None if row.models is None else tuple(row.models),
                         row.expires_at)

    def has_admin(self) -> bool:
        """Whether an active (not revoked, not expired) admin key exists."""
        now = self.clock()
        active = (ApiKey.admin.is_(True), ApiKey.revoked_at.is_(None),
                  or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now))
        with self.store.read() as session:
            return session.scalar(select(ApiKey.id).where(*active).limit(1)) is not None

    def import_json(self, path: Path) -> int:
        """Import the keys of an old `keys.json` (a list of {name, key_hash, display, admin,
        created}), keeping their hashes so the keys keep working; returns how many were new.
        Idempotent: a key whose hash is already stored is skipped. A name already taken by a
        different key is a ValueError and nothing is imported. A missing file imports nothing."""
        try:
            rows = json.loads(Path(path).read_text() or "[]")
        except FileNotFoundError:
            return 0
        added = 0
        with self.store.write() as session:
            for entry in rows:
                found = session.scalar(select(ApiKey).where(or_(
                    ApiKey.key_hash == entry["key_hash"], ApiKey.name == entry["name"])))
                if found is not None and found.key_hash == entry["key_hash"]:
                    continue
                if found is not None:
                    raise ValueError(f"{path}: key {entry['name']!r} is already taken by "
                                     "another key in the store")
                created = datetime.fromtimestamp(entry["created"], timezone.utc)
                session.add(ApiKey(name=entry["name"], key_hash=entry["key_hash"],
                                   display=entry["display"], admin=bool(entry["admin"]),
                                   created_at=created))
                session.flush()
                added += 1
        if added:
            log.info("imported %d key(s) from %s", added, path)
        return added

    def _named(self, session, name: str) -> ApiKey:
        row = session.scalar(select(ApiKey).where(ApiKey.name == name))
        if row is None:
            raise KeyError(f"no key named {name!r}")
        return row

    def _info(self, row: ApiKey, spend_pico: int, now: datetime) -> KeyInfo:
        return KeyInfo(row.name, row.display, row.admin, row.rpm, row.tpm, row.budget_pico,
                       None if row.models is None else tuple(row.models), spend_pico,
                       _status(row, now), row.expires_at, row.created_at, row.last_used_at)


def _status(row: ApiKey, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def _limit(name: str, value: int | None) -> int | None:
    if value is not None and (type(value) is not int or not 0 < value <= MAX_STORED):
        raise ValueError(f"{name} must be a positive integer up to {MAX_STORED}, not {value!r}")
    return value


def _models(models: list[str] | None) -> list[str] | None:
    if models is None:
        return None
    models = [m.strip() for m in models]
    if not models or not all(models):
        raise ValueError("models must list at least one model id, none of them empty")
    return models
