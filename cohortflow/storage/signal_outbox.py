"""The signal outbox's rows: owed in the events' transaction, claimed with a lease, then
deleted when delivered or put back with a back-off when Temporal could not be reached."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, rows_per_statement, upsert, utc
from cohortflow.storage.tables import SignalOutbox

# Waits after each failed delivery: a short outage heals fast, a long one is not hammered.
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class OwedSignal:
    """One event's signal, owed to every running campaign of its customer."""

    message_id: str
    customer_key: str
    payload: dict[str, Any]
    attempts: int = 0


@dataclass(frozen=True)
class Backlog:
    """What is still owed: how many signals and since when (the relay's lag)."""

    owed: int
    oldest: datetime | None


async def owe(
    session: AsyncSession,
    signals: Sequence[OwedSignal],
    *,
    now: datetime,
    held: timedelta = timedelta(0),
) -> None:
    """Record signals owed, due at once or, ``held`` for the caller to deliver itself, once
    that hold ends; an event already owed is not owed twice."""
    rows = [
        {
            "message_id": s.message_id,
            "customer_key": s.customer_key,
            "payload": s.payload,
            "created_at": utc(now),
            "due_at": utc(now) + held,
            "attempts": 0,
        }
        for s in signals
    ]
    if rows:
        stmt = upsert(session, SignalOutbox).on_conflict_do_nothing(
            index_elements=[SignalOutbox.message_id]
        )
        await session.execute(stmt, rows)


async def claim(
    session: AsyncSession,
    *,
    now: datetime,
    lease: timedelta,
    limit: int,
) -> list[OwedSignal]:
    """Take up to ``limit`` due signals for ``lease``.

    The guarded update makes a claim exclusive: two relays racing for a row both see it due,
    and only one update still matches it.
    """
    query = select(SignalOutbox.message_id).where(SignalOutbox.due_at <= utc(now))
    ids = list(await session.scalars(query.order_by(SignalOutbox.due_at).limit(limit)))
    claimed: list[OwedSignal] = []
    for chunk in chunked(ids, rows_per_statement(session, 1)):
        result = await session.execute(
            update(SignalOutbox)
            .where(SignalOutbox.message_id.in_(chunk), SignalOutbox.due_at <= utc(now))
            .values(due_at=utc(now) + lease)
            .returning(
                SignalOutbox.message_id,
                SignalOutbox.customer_key,
                SignalOutbox.payload,
                SignalOutbox.attempts,
            )
        )
        claimed.extend(OwedSignal(*row) for row in result)
    return claimed


async def delivered(session: AsyncSession, message_ids: Sequence[str]) -> None:
    """Forget signals that reached every running campaign of their customer."""
    for chunk in chunked(list(message_ids), rows_per_statement(session, 1)):
        await session.execute(delete(SignalOutbox).where(SignalOutbox.message_id.in_(chunk)))


async def failed(
    session: AsyncSession, signals: Sequence[OwedSignal], error: str, *, now: datetime
) -> None:
    """Put signals back, due again after a back-off that grows with their attempts."""
    by_attempts: dict[int, list[str]] = {}
    for signal in signals:
        by_attempts.setdefault(signal.attempts, []).append(signal.message_id)
    for attempts, ids in by_attempts.items():
        wait = BACKOFF[min(attempts, len(BACKOFF) - 1)]
        for chunk in chunked(ids, rows_per_statement(session, 1)):
            await session.execute(
                update(SignalOutbox)
                .where(SignalOutbox.message_id.in_(chunk))
                .values(
                    due_at=utc(now) + timedelta(seconds=wait),
                    attempts=attempts + 1,
                    last_error=error[:500],
                )
            )


async def backlog(session: AsyncSession) -> Backlog:
    """How many signals are owed and the oldest one's creation time."""
    count, oldest = (
        await session.execute(select(func.count(), func.min(SignalOutbox.created_at)))
    ).one()
    return Backlog(int(count or 0), utc(oldest) if oldest is not None else None)
