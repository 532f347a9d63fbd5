"""Retention of raw events: events older than a cutoff are folded into their customer's
rollup (``events.rollup``) and deleted, in one transaction per page of customers, so the
features computed afterwards equal those the whole log would give and the audit chain,
which holds no event, is untouched."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.events.features import FeatureEvent
from cohortflow.events.rollup import Rollup, fold
from cohortflow.storage._sql import chunked, rows_per_statement, upsert, utc
from cohortflow.storage.tables import Event, EventRollup

PAGE = 500


def day_cutoff(now: datetime, days: int) -> datetime:
    """The purge cutoff ``days`` before ``now``: a UTC midnight, so whole days go."""
    return datetime.combine(utc(now).date() - timedelta(days=days), time(), tzinfo=UTC)


async def rollups_of(session: AsyncSession, customer_keys: Sequence[str]) -> dict[str, Rollup]:
    """The rollups of these customers (those that have one)."""
    found: dict[str, Rollup] = {}
    for chunk in chunked(list(customer_keys), rows_per_statement(session, 1)):
        rows = await session.execute(
            select(EventRollup.customer_key, EventRollup.summary).where(
                EventRollup.customer_key.in_(chunk)
            )
        )
        found |= {key: Rollup.from_json(summary) for key, summary in rows}
    return found


async def purge_page(
    session: AsyncSession, before: datetime, *, page: int = PAGE, now: datetime | None = None
) -> int:
    """Fold and delete the events before ``before`` of up to ``page`` customers; how many
    events went (0 when none is left)."""
    keys = list(
        (
            await session.scalars(
                select(Event.customer_key).where(Event.occurred_at < before).distinct().limit(page)
            )
        ).all()
    )
    if not keys:
        return 0
    rollups = await rollups_of(session, keys)
    old = await session.execute(
        select(Event.customer_key, Event.type, Event.event, Event.occurred_at, Event.properties)
        .where(Event.customer_key.in_(keys), Event.occurred_at < before)
        .order_by(Event.customer_key, Event.occurred_at)
    )
    by_key: dict[str, list[FeatureEvent]] = {}
    for key, type_, event, at, properties in old:
        by_key.setdefault(key, []).append(FeatureEvent(type_, event, at, properties))
    at = utc(now)
    for key, events in by_key.items():
        summary = fold(rollups.get(key), events).to_json()
        await session.execute(
            upsert(session, EventRollup)
            .values(customer_key=key, summary=summary, through=before, updated_at=at)
            .on_conflict_do_update(
                index_elements=[EventRollup.customer_key],
                set_={"summary": summary, "through": before, "updated_at": at},
            )
        )
    await session.execute(
        delete(Event).where(Event.customer_key.in_(keys), Event.occurred_at < before)
    )
    return sum(len(events) for events in by_key.values())
