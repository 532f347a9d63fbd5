"""Feature updates from the event log: per touched customer, or all of them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.events.features import (
    FeatureEvent,
    RecentDays,
    as_of_instant,
    compute_features,
)
from cohortflow.storage.customers import FeatureRow, upsert_features
from cohortflow.storage.db import Database
from cohortflow.storage.events import customer_keys_with_events, events_of
from cohortflow.storage.retention import rollups_of

RECOMPUTE_PAGE = 2_000


async def update_features(
    session: AsyncSession, customer_keys: Sequence[str], *, now: datetime | None = None
) -> int:
    """Recompute and store the features of these customers from their events (and the
    rollup of those retention purged).

    Called in the transaction that stored their new events, so features never reflect half
    a batch. Customers with only ``identify`` events get no feature row. Returns how many
    rows were written.
    """
    history = await events_of(session, customer_keys)
    rollups = await rollups_of(session, customer_keys)
    rows: list[FeatureRow] = []
    recent: dict[str, RecentDays] = {}
    for key, events in history.items():
        tracked = [
            FeatureEvent(e.type, e.event, e.occurred_at, e.properties)
            for e in events
            if e.type == "track"
        ]
        if tracked:
            computed = compute_features(tracked, rollups.get(key))
            rows.append((key, computed.features, as_of_instant(computed.as_of)))
            recent[key] = computed.recent
    return await upsert_features(session, rows, now=now, recent=recent)


async def recompute_all(db: Database, *, page: int = RECOMPUTE_PAGE) -> int:
    """Recompute every customer's features from the whole event log; returns how many."""
    after = ""
    written = 0
    while True:
        async with db.transaction() as session:
            keys = await customer_keys_with_events(session, after, page)
            if not keys:
                return written
            written += await update_features(session, keys)
        after = keys[-1]
