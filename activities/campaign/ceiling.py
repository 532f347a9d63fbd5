"""One rate ceiling per CRM, in requests per window, shared by every worker process.

Each request holds a slot in the database (``storage.crm_ledger``): a sliding log of the
requests of the last window, counted under one lock per ceiling. A slot is taken before the
request is sent and stamped again when its answer comes: the CRM counted the request at some
moment in between, so a request that waited long in a busy event loop, a connection pool or
the network still never lands in a window the CRM sees as full. The database is already
shared by every process (SQLite file or PostgreSQL), so the ceiling needs nothing more to run;
a request costs two short transactions, negligible beside the CRM call at the tens of requests
a second CRMs allow.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from cohortflow.storage import crm_ledger
from cohortflow.storage.db import Database

# Worker hosts' clocks differ a little, and every process compares its stamps with the
# others': a slot is freed this much later than the window says.
SAFETY_MARGIN = timedelta(milliseconds=100)


@dataclass(frozen=True)
class CeilingConfig:
    """``limit`` requests per ``window`` to the CRM named ``name`` (its kind and URL)."""

    name: str
    limit: int
    window: timedelta


class RequestCeiling:
    """Holds one request's slot in the CRM's window, from before it is sent until it is
    answered."""

    def __init__(self, db: Database, config: CeilingConfig) -> None:
        self._db = db
        self.config = config

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Enter once the request may be sent; on leaving it counts from its answer."""
        slot_id = await self._take()
        try:
            yield
        finally:
            async with self._db.transaction() as session:
                await crm_ledger.request_answered(session, self.config.name, slot_id)

    async def _take(self) -> int:
        window = self.config.window + SAFETY_MARGIN
        while True:
            async with self._db.transaction() as session:
                taken = await crm_ledger.take_request_slot(
                    session, self.config.name, self.config.limit, window
                )
            if taken.id is not None:
                return taken.id
            await asyncio.sleep(taken.wait.total_seconds())
