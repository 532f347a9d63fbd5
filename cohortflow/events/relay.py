"""The relay: delivers the signals the outbox owes to the customers' running campaigns.

Ingestion writes events and the signals they owe in one transaction
(``storage.signal_outbox``), so no event is stored without its signal being owed. The
relay then claims owed signals with a lease, signals every running campaign of each
customer, and deletes what was delivered; when Temporal cannot be reached it puts them back
with a back-off, so they go out once Temporal is back, and a relay that dies mid-delivery
leaves its claims to expire and be taken again. Delivery is at least once: a campaign's
handling of a customer event is idempotent (an exit or a conversion happens once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from cohortflow.events.signals import Signaller, TemporalStatus
from cohortflow.storage import signal_outbox
from cohortflow.storage.db import Database
from cohortflow.storage.signal_outbox import Backlog, OwedSignal
from workflows.campaign.messages import CustomerEvent

log = structlog.get_logger(__name__)

LEASE = timedelta(seconds=30)
CLAIM_LIMIT = 500


@dataclass
class Delivery:
    """What one delivery pass did: signals sent, and whether Temporal answered."""

    signalled: int = 0
    temporal: TemporalStatus = "skipped"


class SignalRelay:
    """Delivers owed signals through ``signaller``."""

    def __init__(self, db: Database, signaller: Signaller, *, lease: timedelta = LEASE) -> None:
        self._db = db
        self._signaller = signaller
        self._lease = lease

    @property
    def lease(self) -> timedelta:
        """How long a claim holds a signal before another relay may take it."""
        return self._lease

    async def deliver(self) -> Delivery:
        """Deliver what is due until nothing due is left or Temporal fails."""
        delivery = Delivery()
        while True:
            now = datetime.now(UTC)
            async with self._db.transaction() as session:
                owed = await signal_outbox.claim(
                    session, now=now, lease=self._lease, limit=CLAIM_LIMIT
                )
            if not owed or not await self._send(owed, now, None, delivery):
                return delivery

    async def deliver_held(self, owed: Sequence[OwedSignal], *, within: float) -> Delivery:
        """Deliver signals owed ``held`` for this caller (``signal_outbox.owe``): no other
        relay takes them before the lease ends, so the caller's count is the whole truth.
        After ``within`` seconds it stops signalling; what is left, the relay delivers once
        the hold ends."""
        delivery = Delivery()
        deadline = asyncio.get_running_loop().time() + within
        if owed:
            await self._send(owed, datetime.now(UTC), deadline, delivery)
        return delivery

    async def _send(
        self, owed: Sequence[OwedSignal], now: datetime, deadline: float | None, delivery: Delivery
    ) -> bool:
        """Signal ``owed`` and settle them in the outbox; False once Temporal failed."""
        try:
            # Only the call to Temporal is cut short, never a database transaction:
            # cancelled inside one, asyncpg left its pooled connection unusable, and
            # after a PostgreSQL restart under load that exhausted the pool for minutes.
            async with asyncio.timeout_at(deadline):
                sent = await self._signaller([(s.customer_key, _event(s)) for s in owed])
        except TimeoutError:
            delivery.temporal = "unreachable"
            return False
        async with self._db.transaction() as session:
            if sent is None:
                await signal_outbox.failed(session, owed, "temporal unreachable", now=now)
                delivery.temporal = "unreachable"
                return False
            await signal_outbox.delivered(session, [s.message_id for s in owed])
        delivery.signalled += sent
        delivery.temporal = "ok"
        return True

    async def backlog(self) -> Backlog:
        """What is still owed (its size and age are the relay's lag)."""
        async with self._db.transaction() as session:
            return await signal_outbox.backlog(session)

    async def run(self, stop: asyncio.Event, *, interval: float = 1.0) -> None:
        """Deliver every ``interval`` seconds until ``stop`` is set; errors are logged and
        retried on the next round (the database may be briefly away too)."""
        while not stop.is_set():
            try:
                await self.deliver()
            except Exception as exc:  # any failure here is retried next round
                log.warning("signal relay round failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _event(signal: OwedSignal) -> CustomerEvent:
    return CustomerEvent(**signal.payload)
