"""The event log: idempotent appends keyed by message id, per-customer history, counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, rows_per_statement, upsert, utc
from cohortflow.storage.tables import Customer, Event


@dataclass(frozen=True)
class EventRecord:
    """A validated event as stored: the customer is already pseudonymised."""

    message_id: str
    customer_key: str
    type: str
    event: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] | None = None


@dataclass(frozen=True)
class IdentityRecord:
    """Who a customer key belongs to: the raw id and contact data, for ``customers`` only."""

    customer_key: str
    source_id: str
    email: str | None = None
    timezone: str | None = None
    attributes: dict[str, Any] | None = None


async def upsert_identities(
    session: AsyncSession, identities: Sequence[IdentityRecord], *, now: datetime | None = None
) -> None:
    """Create customers seen for the first time; update contact data an identify carried.

    A track event carries no contact data, so its identity never blanks an e-mail address
    or a time zone an earlier identify stored: ``COALESCE`` keeps the stored e-mail, and
    the time zone is only written by identities that carry one.
    """
    created_at = utc(now)
    latest: dict[str, IdentityRecord] = {}
    for identity in identities:
        # A batch may name one customer twice (identify, then track): what the later one
        # does not carry, the earlier one's contact data fills in.
        prior = latest.get(identity.customer_key)
        if prior is not None:
            identity = IdentityRecord(
                identity.customer_key,
                identity.source_id,
                email=identity.email or prior.email,
                timezone=identity.timezone or prior.timezone,
                attributes=prior.attributes if identity.attributes is None else identity.attributes,
            )
        latest[identity.customer_key] = identity
    rows = [
        {
            "customer_key": i.customer_key,
            "source_id": i.source_id,
            "email": i.email,
            "timezone": i.timezone,
            "attributes": i.attributes or {},
            "created_at": created_at,
        }
        for i in latest.values()
    ]
    with_zone = [r for r, i in zip(rows, latest.values(), strict=True) if i.timezone]
    without_zone = [r for r, i in zip(rows, latest.values(), strict=True) if not i.timezone]
    for group, keeps_zone in ((with_zone, False), (without_zone, True)):
        if not group:
            continue
        stmt = upsert(session, Customer)
        updates: dict[str, Any] = {"email": func.coalesce(stmt.excluded.email, Customer.email)}
        if not keeps_zone:
            updates["timezone"] = stmt.excluded.timezone
        # Many parameter sets for one compiled statement (see insert_events).
        await session.execute(
            stmt.on_conflict_do_update(index_elements=[Customer.customer_key], set_=updates),
            group,
        )
    # Traits other than contact fields replace the stored ones only when an identify sent them.
    for identity in latest.values():
        if identity.attributes is not None:
            customer = await session.get(Customer, identity.customer_key)
            if customer is not None:
                customer.attributes = dict(identity.attributes)


async def insert_events(
    session: AsyncSession, records: Sequence[EventRecord], *, now: datetime | None = None
) -> set[str]:
    """Append events whose message id is new; returns the message ids actually inserted."""
    received_at = utc(now)
    rows = [
        {
            "message_id": r.message_id,
            "customer_key": r.customer_key,
            "type": r.type,
            "event": r.event,
            "occurred_at": utc(r.occurred_at),
            "received_at": received_at,
            "properties": r.properties,
            "raw": r.raw,
        }
        for r in records
    ]
    if not rows:
        return set()
    # One statement with many parameter sets: SQLAlchemy batches it ("insertmanyvalues")
    # from a statement compiled once, where a literal multi-row VALUES would be compiled
    # anew for every batch size, which cost more than the insert itself.
    result = await session.execute(
        upsert(session, Event)
        .on_conflict_do_nothing(index_elements=[Event.message_id])
        .returning(Event.message_id),
        rows,
    )
    return set(result.scalars())


async def events_of(
    session: AsyncSession, customer_keys: Sequence[str]
) -> dict[str, list[EventRecord]]:
    """Every stored event of these customers, oldest first, grouped by customer key."""
    found: dict[str, list[EventRecord]] = {key: [] for key in customer_keys}
    for chunk in chunked(list(found), rows_per_statement(session, 1)):
        # Plain rows, not ORM objects: this runs for every batch and is the hot path.
        result = await session.execute(
            select(
                Event.message_id,
                Event.customer_key,
                Event.type,
                Event.event,
                Event.occurred_at,
                Event.properties,
            )
            .where(Event.customer_key.in_(chunk))
            .order_by(Event.customer_key, Event.occurred_at, Event.message_id)
        )
        for row in result:
            found[row[1]].append(EventRecord(*row))
    return found


async def customer_keys_with_events(session: AsyncSession, after: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct customer keys with events, in key order, after ``after``."""
    result = await session.scalars(
        select(Event.customer_key)
        .where(Event.customer_key > after)
        .group_by(Event.customer_key)
        .order_by(Event.customer_key)
        .limit(limit)
    )
    return list(result)


async def count_events(
    session: AsyncSession,
    customer_keys: Sequence[str],
    event: str,
    start: datetime,
    end: datetime,
) -> dict[str, int]:
    """How many ``event`` events each customer had with ``start <= occurred_at < end``.

    Every requested key is in the result, with 0 when it had none.
    """
    counts = dict.fromkeys(customer_keys, 0)
    for chunk in chunked(list(counts), rows_per_statement(session, 1)):
        result = await session.execute(
            select(Event.customer_key, func.count())
            .where(
                Event.customer_key.in_(chunk),
                Event.event == event,
                Event.occurred_at >= utc(start),
                Event.occurred_at < utc(end),
            )
            .group_by(Event.customer_key)
        )
        for key, count in result:
            counts[key] = int(count)
    return counts


async def count_all_events(session: AsyncSession) -> int:
    """How many events are stored."""
    return int(await session.scalar(select(func.count()).select_from(Event)) or 0)
