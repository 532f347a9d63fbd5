"""Customers (the only raw ids and contacts) and their latest feature vectors."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.events.features import RecentDays, features_as_of
from cohortflow.storage._sql import chunked, in_list, rows_per_statement, table_of, upsert, utc
from cohortflow.storage.db import Database
from cohortflow.storage.feature_snapshot import mark_changed
from cohortflow.storage.tables import Customer, CustomerFeatures

FeatureRow = tuple[str, Mapping[str, float | None], datetime]


@dataclass
class CustomerRecord:
    """A customer as imported from the source system."""

    customer_key: str
    source_id: str
    email: str | None
    timezone: str | None = None  # None: campaigns use their spec's default_timezone
    attributes: dict[str, Any] = field(default_factory=dict)


async def upsert_customers(
    session: AsyncSession, records: Sequence[CustomerRecord], *, now: datetime | None = None
) -> int:
    """Insert or update customers by ``customer_key``; returns how many distinct keys.

    ``created_at`` is set on insert only. When one key appears several times, the last
    record wins.
    """
    created_at = utc(now)
    latest = {record.customer_key: record for record in records}
    rows = [
        {
            "customer_key": r.customer_key,
            "source_id": r.source_id,
            "email": r.email,
            "timezone": r.timezone,
            "attributes": r.attributes,
            "created_at": created_at,
        }
        for r in latest.values()
    ]
    for chunk in chunked(rows, rows_per_statement(session, 6)):
        stmt = upsert(session, Customer).values(list(chunk))
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[Customer.customer_key],
                set_={
                    "source_id": stmt.excluded.source_id,
                    "email": stmt.excluded.email,
                    "timezone": stmt.excluded.timezone,
                    "attributes": stmt.excluded.attributes,
                },
            )
        )
    return len(rows)


async def get_customer(session: AsyncSession, customer_key: str) -> Customer | None:
    """The customer with this key, or None."""
    return await session.get(Customer, customer_key)


async def timezone_name(session: AsyncSession, customer_key: str) -> str:
    """The customer's time zone name as stored: ``attributes.timezone``, else the
    ``timezone`` column, else "" (unknown customer or none stored). Not checked against the
    zone database: the caller falls back to its default (``schedule.zone``)."""
    customer = await get_customer(session, customer_key)
    if customer is None:
        return ""
    return str(customer.attributes.get("timezone") or customer.timezone or "")


def _clean_features(features: Mapping[str, float | None]) -> dict[str, float | None]:
    # JSON has no NaN or infinity; a non-finite feature is as good as missing.
    cleaned: dict[str, float | None] = {}
    for name, value in features.items():
        number = None if value is None else float(value)
        cleaned[name] = number if number is not None and math.isfinite(number) else None
    return cleaned


async def upsert_features(
    session: AsyncSession,
    rows: Sequence[FeatureRow],
    *,
    now: datetime | None = None,
    recent: Mapping[str, RecentDays] | None = None,
) -> int:
    """Store each customer's feature vector as of a time, with the recent days that
    re-window it (``recent``, by key, when computed from events); returns how many were
    written.

    A vector older than the one stored (an earlier ``as_of``) is skipped, so late or
    replayed batches never roll features back. Non-finite values are stored as None.
    """
    updated_at = utc(now)
    newest: dict[str, tuple[dict[str, float | None], datetime]] = {}
    for key, features, as_of in rows:
        as_of_utc = utc(as_of)
        current = newest.get(key)
        if current is None or as_of_utc >= current[1]:
            newest[key] = (_clean_features(features), as_of_utc)
    days = recent or {}
    values = [
        {
            "customer_key": key,
            "features": features,
            "as_of": as_of,
            "updated_at": updated_at,
            "recent": days[key].to_json() if key in days else None,
        }
        for key, (features, as_of) in newest.items()
    ]
    written: list[str] = []
    for chunk in chunked(values, rows_per_statement(session, 5)):
        stmt = upsert(session, CustomerFeatures).values(list(chunk))
        result = await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[CustomerFeatures.customer_key],
                set_={
                    "features": stmt.excluded.features,
                    "as_of": stmt.excluded.as_of,
                    "updated_at": stmt.excluded.updated_at,
                    "recent": stmt.excluded.recent,
                },
                where=CustomerFeatures.as_of <= stmt.excluded.as_of,
            ).returning(CustomerFeatures.customer_key)
        )
        written.extend(result.scalars())
    await mark_changed(session, written)
    return len(written)


# Core and built once: for one customer (a campaign's score step) the ORM's work on a fresh
# statement cost more than the read itself.
_FEATURES_TABLE = table_of(CustomerFeatures)
_FEATURES_OF = select(
    _FEATURES_TABLE.c.customer_key,
    _FEATURES_TABLE.c.features,
    _FEATURES_TABLE.c.as_of,
    _FEATURES_TABLE.c.recent,
).where(_FEATURES_TABLE.c.customer_key.in_(bindparam("keys", expanding=True)))


async def get_features(
    session: AsyncSession, keys: Sequence[str], at: datetime | None = None
) -> dict[str, dict[str, float | None]]:
    """Feature vectors by customer key, true as of the day of ``at`` (default now; never
    before the day they were computed for: see ``events.features.features_as_of``); keys
    without features are absent."""
    day = utc(at).date()
    found: dict[str, dict[str, float | None]] = {}
    for chunk in chunked(list(dict.fromkeys(keys)), rows_per_statement(session, 1)):
        result = await session.execute(_FEATURES_OF, {"keys": list(chunk)})
        found |= _as_of(result, day)
    return found


async def read_features(
    db: Database, keys: Sequence[str], at: datetime | None = None
) -> dict[str, dict[str, float | None]]:
    """As :func:`get_features`, in a read of its own: a campaign's score step reads its
    customer's row this way, on a SQLite file as a point read (``Database.point_read``)."""
    distinct = list(dict.fromkeys(keys))
    if 0 < len(distinct) <= POINT_READ_KEYS:
        raw = db.point_read(_point_features_sql(len(distinct)), distinct)
        if raw is not None:
            decode = _point_decoders(db)
            rows = [tuple(d(v) if d else v for d, v in zip(decode, r, strict=True)) for r in raw]
            return _as_of(rows, utc(at).date())
    async with db.read_transaction() as session:
        return await get_features(session, distinct, at)


def _as_of(rows: Iterable[Sequence[Any]], day: date) -> dict[str, dict[str, float | None]]:
    found: dict[str, dict[str, float | None]] = {}
    for key, features, as_of, recent in rows:
        days = RecentDays.from_json(recent) if recent is not None else None
        computed = utc(as_of).date()
        found[key] = features_as_of(features, computed, days, max(day, computed))
    return found


# A campaign reads one customer; a point read stays well inside SQLite's parameter limit.
POINT_READ_KEYS = 100


@functools.cache
def _point_features_sql(n: int) -> str:
    # The columns of the session's statement, in its order.
    columns = ", ".join(c.name for c in _FEATURES_OF.selected_columns)
    marks = ", ".join("?" * n)
    key = _FEATURES_TABLE.c.customer_key.name
    return f"SELECT {columns} FROM {_FEATURES_TABLE.name} WHERE {key} IN ({marks})"


def _point_decoders(db: Database) -> list[Callable[[Any], Any] | None]:
    """The column types' own result processing (JSON, UTC datetimes), as a session does it."""
    dialect = db.engine.dialect
    return [
        c.type.dialect_impl(dialect).result_processor(dialect, None)
        for c in _FEATURES_OF.selected_columns
    ]


async def emails(session: AsyncSession, customer_keys: Collection[str]) -> dict[str, str]:
    """The e-mail address of each of these customers that has one."""
    found: dict[str, str] = {}
    for chunk in in_list(list(customer_keys)):
        rows = await session.execute(
            select(Customer.customer_key, Customer.email).where(
                Customer.customer_key.in_(chunk), Customer.email.is_not(None)
            )
        )
        found |= {key: email for key, email in rows if email}
    return found
