"""The signal outbox's rows: owed in the transaction that records what they tell (events, a
consent change), claimed with a lease, then deleted when delivered or put back with a
back-off when Temporal could not be reached. A customer's signals go out in the order they
were owed: none is taken while one owed before it waits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from cohortflow.storage._sql import chunked, in_list, rows_per_statement, upsert, utc
from cohortflow.storage.tables import SignalOutbox

# Waits after each failed delivery: a short outage heals fast, a long one is not hammered.
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class OwedSignal:
    """One signal (``signal`` names its handler, ``payload`` holds its fields), owed to
    every running campaign of its customer."""

    message_id: str
    customer_key: str
    payload: dict[str, Any]
    attempts: int = 0
    signal: str = "customer_event"


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
) -> list[OwedSignal]:
    """Record signals owed, in the order given, due at once or, ``held`` for the caller to
    deliver itself, once that hold ends; a signal already owed is not owed twice.

    Returns what the caller holds. A customer who is still owed signals from before gets
    these behind them, due at once: the relay delivers them in order, where the caller
    could overtake the ones before.
    """
    behind = await _owing(session, {s.customer_key for s in signals}) if held else set()
    rows = [
        {
            "message_id": s.message_id,
            "customer_key": s.customer_key,
            "signal": s.signal,
            "payload": s.payload,
            "created_at": utc(now),
            "seq": seq,
            "due_at": utc(now) + (timedelta(0) if s.customer_key in behind else held),
            "attempts": 0,
        }
        for seq, s in enumerate(signals)
    ]
    if rows:
        stmt = upsert(session, SignalOutbox).on_conflict_do_nothing(
            index_elements=[SignalOutbox.message_id]
        )
        await session.execute(stmt, rows)
    return [s for s in signals if held and s.customer_key not in behind]


async def _owing(session: AsyncSession, customer_keys: set[str]) -> set[str]:
    """Which of these customers are still owed signals."""
    owing: set[str] = set()
    for chunk in in_list(sorted(customer_keys)):
        query = select(SignalOutbox.customer_key).where(SignalOutbox.customer_key.in_(chunk))
        owing.update(await session.scalars(query.distinct()))
    return owing


async def claim(
    session: AsyncSession,
    *,
    now: datetime,
    lease: timedelta,
    limit: int,
) -> list[OwedSignal]:
    """Take up to ``limit`` due signals for ``lease``, oldest owed first.

    A customer's signal waits while one owed before it is not due (held, leased, backing
    off), so a customer's signals go out in the order they were owed. The guarded update
    makes a claim exclusive: two relays racing for a row both see it due, and only one
    update still matches it.
    """
    earlier = aliased(SignalOutbox)
    waiting = exists().where(
        earlier.customer_key == SignalOutbox.customer_key,
        earlier.due_at > utc(now),
        or_(
            earlier.created_at < SignalOutbox.created_at,
            and_(earlier.created_at == SignalOutbox.created_at, earlier.seq < SignalOutbox.seq),
        ),
    )
    query = select(SignalOutbox.message_id).where(SignalOutbox.due_at <= utc(now), ~waiting)
    order = (SignalOutbox.created_at, SignalOutbox.seq)
    ids = list(await session.scalars(query.order_by(*order).limit(limit)))
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
                SignalOutbox.signal,
            )
        )
        claimed.extend(OwedSignal(*row) for row in result)
    place = {message_id: n for n, message_id in enumerate(ids)}
    # RETURNING promises no order; the relay sends them as listed.
    return sorted(claimed, key=lambda s: place[s.message_id])


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
