"""The store's tables (SQLAlchemy 2 declarative models). Alembic migrations in `migrations/`
create them; a change here needs a new migration there.

Money is integer picodollars (1e-12 USD) in BigInteger columns, so sums never round. Times are
timezone-aware UTC datetimes in Python on every backend (`UTCDateTime`)."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator):
    """A datetime stored as UTC and read back timezone-aware: PostgreSQL keeps the zone itself,
    SQLite stores naive UTC text, and this type re-attaches UTC on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(
            timezone.utc)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """One API key. Only its sha256 is stored; `display` is safe to log and show."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # chosen by the admin
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # sha256 hex
    display: Mapped[str] = mapped_column(String(40))  # sk-tm-abcd...wxyz
    admin: Mapped[bool] = mapped_column(default=False)
    rpm: Mapped[int | None] = mapped_column(Integer)  # requests per minute; None: unlimited
    tpm: Mapped[int | None] = mapped_column(Integer)  # tokens per minute; None: unlimited
    budget_pico: Mapped[int | None] = mapped_column(BigInteger)  # spend cap; None: unlimited
    models: Mapped[list[str] | None] = mapped_column(JSON)  # allowed model ids; None: all
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # refused from then on
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # refused from then on
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # to the minute


class UsageRecord(Base):
    """One request, billed: exactly one row per response id."""

    __tablename__ = "usage_records"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)  # the response id, chatcmpl-...
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)  # of prompt_tokens, served from cache
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_pico: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # completed | aborted | error
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
