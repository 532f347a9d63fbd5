"""One rate ceiling per CRM, in requests per window, shared by every worker process.

Each request first takes a slot in the database (``storage.crm_ledger.take_request_slot``):
a sliding log of what was sent in the last window, counted under one lock per ceiling. The
database is already shared by every process (SQLite file or PostgreSQL), so the ceiling needs
nothing more to run; a request costs one short transaction, negligible beside the CRM call at
the tens of requests a second CRMs allow.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from cohortflow.storage import crm_ledger
from cohortflow.storage.db import Database

# Sent requests reach the CRM a little after we count them: a slot is freed this much later
# than the window says, so the CRM's own count never sees one request too many.
SAFETY_MARGIN = timedelta(milliseconds=250)


@dataclass(frozen=True)
class CeilingConfig:
    """``limit`` requests per ``window`` to the CRM named ``name`` (its kind and URL)."""

    name: str
    limit: int
    window: timedelta


class RequestCeiling:
    """Waits until the CRM's window has room, then counts the request in it."""

    def __init__(self, db: Database, config: CeilingConfig) -> None:
        self._db = db
        self.config = config

    async def acquire(self) -> None:
        """Return once a request may be sent; it is counted from now."""
        window = self.config.window + SAFETY_MARGIN
        while True:
            async with self._db.transaction() as session:
                wait = await crm_ledger.take_request_slot(
                    session, self.config.name, self.config.limit, window
                )
            if wait <= timedelta(0):
                return
            await asyncio.sleep(wait.total_seconds())
