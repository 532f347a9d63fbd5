"""The retention schedule: the worker purges raw events older than the configured period
every hour (``storage.retention`` folds them into rollups first)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog

from cohortflow.storage.db import Database
from cohortflow.storage.retention import day_cutoff, purge_page

log = structlog.get_logger(__name__)
INTERVAL_SECONDS = 3600.0


async def purge(db: Database, days: int, *, now: datetime | None = None) -> int:
    """Purge every event older than ``days`` days, one page of customers per transaction;
    how many went."""
    cutoff = day_cutoff(now or datetime.now(UTC), days)
    purged = 0
    while True:
        async with db.transaction() as session:
            done = await purge_page(session, cutoff)
        if not done:
            break
        purged += done
    log.info("events purged", count=purged, before=cutoff.isoformat())
    return purged


async def run_purges(
    db: Database, days: int, stop: asyncio.Event, *, interval: float = INTERVAL_SECONDS
) -> None:
    """Purge at once, then every ``interval`` seconds until ``stop``; a failed pass is
    logged and the next one retries."""
    while not stop.is_set():
        try:
            await purge(db, days)
        except Exception as exc:  # the next pass starts over from what is left
            log.warning("event purge failed", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
