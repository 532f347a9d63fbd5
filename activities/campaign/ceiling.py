"""One rate ceiling per CRM, in requests per window, shared by every worker process.

Each request holds a slot in the database (``storage.crm_ledger``): a sliding log of the
requests of the last window, counted under one lock per ceiling. A slot is taken before the
request is sent and, once answered, stamped again with the moment the request reached the
wire (the transport reports it): the CRM counts a request on arrival, so one that waited in a
busy event loop or for a pooled connection after taking its slot still never lands in a
window the CRM sees as full, and the request's own latency does not hold the slot. The
database is already shared by every process (SQLite file or PostgreSQL), so the ceiling needs
nothing more to run; a request costs two short transactions, negligible beside the CRM call
at the tens of requests a second CRMs allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from cohortflow import metrics
from cohortflow.crm._http import WireStamp
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
    """Holds one request's slot in the CRM's window, from before it is sent until a window
    after it reached the wire."""

    def __init__(self, db: Database, config: CeilingConfig) -> None:
        self._db = db
        self.config = config

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[WireStamp]:
        """Enter once the request may be sent; on leaving it counts from when the request
        reached the wire, or from now when the transport could not tell."""
        began = time.perf_counter()
        slot_id = await self._take()
        metrics.count("cohortflow_crm_requests", "Requests sent to the CRM", {})
        metrics.observe_seconds(
            "cohortflow_crm_ceiling_wait_seconds",
            "How long a CRM request waited for a slot under the shared ceiling",
            time.perf_counter() - began,
        )
        stamp = WireStamp()
        try:
            yield stamp
        finally:
            async with self._db.transaction() as session:
                await crm_ledger.request_sent(session, self.config.name, slot_id, at=stamp.sent_at)

    async def _take(self) -> int:
        window = self.config.window + SAFETY_MARGIN
        while True:
            async with self._db.transaction() as session:
                taken = await crm_ledger.take_request_slot(
                    session, self.config.name, self.config.limit, window
                )
            metrics.set_gauge(
                "cohortflow_crm_ceiling_used",
                "Share of the CRM's request ceiling in use when a request asked for a slot",
                min(taken.used / self.config.limit, 1.0),
            )
            if taken.id is not None:
                return taken.id
            await asyncio.sleep(taken.wait.total_seconds())
