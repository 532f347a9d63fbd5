"""The relay: delivers the signals the outbox owes to the customers' running campaigns.

Ingestion writes events, and an operator's consent change writes the change, in one
transaction with the signals they owe (``storage.signal_outbox``), so nothing is stored
without its signal being owed. The caller then delivers its own signals right after the
commit (``deliver_held``); the relay claims whatever else is owed with a lease, signals every
running campaign of each customer, in the order the customer's signals were owed, and
deletes what was delivered. When Temporal cannot be reached it puts them back with a
back-off, so they go out once Temporal is back, and a relay that dies mid-delivery leaves
its claims to expire and be taken again. Delivery is at least once: a campaign's handling of
a customer event is idempotent (an exit or a conversion happens once), and a consent change
says the state it sets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.events.signals import CampaignSignal, Signaller, TemporalStatus
from cohortflow.storage import signal_outbox
from cohortflow.storage.db import Database
from cohortflow.storage.signal_outbox import Backlog, OwedSignal
from workflows.campaign.contract import HandlerName
from workflows.campaign.messages import ConsentChanged, CustomerEvent

log = structlog.get_logger(__name__)

LEASE = timedelta(seconds=30)
CLAIM_LIMIT = 500
# How long a request waits for its own signals before leaving them to the relay.
DELIVER_NOW_SECONDS = 2.0
# What each outbox row's ``signal`` carries.
_MESSAGES: dict[str, type[CustomerEvent] | type[ConsentChanged]] = {
    HandlerName.CUSTOMER_EVENT: CustomerEvent,
    HandlerName.CONSENT_CHANGED: ConsentChanged,
}


@dataclass
class Delivery:
    """What one delivery pass did: signals sent, and whether Temporal answered."""

    signalled: int = 0
    temporal: TemporalStatus = "skipped"


@dataclass
class Held:
    """What a caller owed: the signals it holds to deliver itself, and how many it left to
    the relay behind the customer's earlier ones."""

    signals: list[OwedSignal] = field(default_factory=list)
    queued: int = 0


class SignalRelay:
    """Delivers owed signals through ``signaller``."""

    def __init__(self, db: Database, signaller: Signaller, *, lease: timedelta = LEASE) -> None:
        self._db = db
        self._signaller = signaller
        self._lease = lease

    async def owe(
        self, session: AsyncSession, signals: Sequence[OwedSignal], *, now: datetime
    ) -> Held:
        """Owe ``signals`` in the caller's transaction, held for the caller to deliver right
        after its commit (:meth:`deliver_held`): the relay's own rounds cannot take them
        first and leave the caller told 0. A customer still owed earlier signals gets these
        behind them, left to the relay, which keeps the order the caller could break."""
        held = await signal_outbox.owe(session, signals, now=now, held=self._lease)
        return Held(held, len(signals) - len(held))

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

    async def deliver_held(self, held: Held, *, within: float = DELIVER_NOW_SECONDS) -> Delivery:
        """Deliver the signals :meth:`owe` held for this caller: no other relay takes them
        before the lease ends, so the caller's count is the whole truth. After ``within``
        seconds it stops signalling; what is left, the relay delivers once the hold ends.
        With nothing held but some left to the relay, the delivery says ``queued``."""
        delivery = Delivery(temporal="queued" if held.queued else "skipped")
        deadline = asyncio.get_running_loop().time() + within
        if held.signals:
            await self._send(held.signals, datetime.now(UTC), deadline, delivery)
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
                sent = await self._signaller([(s.customer_key, _message(s)) for s in owed])
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


def _message(signal: OwedSignal) -> CampaignSignal:
    """The message an outbox row carries, by the signal it names."""
    return _MESSAGES[signal.signal](**signal.payload)
