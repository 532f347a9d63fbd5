"""The CRM's confirmed effects by idempotency key, and the request ceiling all processes share.

The ledger (``crm_effects``) is how a write happens once at a CRM with no idempotency of its
own: a key found here is not sent again. The ceiling (``crm_requests``) is a sliding log of
the requests sent within the CRM's rate window: a request may go when fewer than the limit
were sent in the last window, counted under one lock per ceiling in every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import dialect_name, in_list, table_of, upsert, utc
from cohortflow.storage.tables import CrmEffect, CrmRequest

# The first key of the ceiling's two-key advisory lock on PostgreSQL ("ceil" in ASCII).
CEILING_LOCK_SPACE = 0x6365696C


@dataclass(frozen=True)
class Effect:
    """One confirmed effect, as the ledger keeps it."""

    idempotency_key: str
    workflow_id: str
    step_id: str
    customer_key: str
    action: str
    target: str
    properties: list[str]
    crm_id: str
    how: str  # answered | read_back


async def confirmed(session: AsyncSession, idempotency_key: str) -> CrmEffect | None:
    """The effect recorded under ``idempotency_key``, if the CRM confirmed one."""
    return await session.get(CrmEffect, idempotency_key)


async def record(session: AsyncSession, effect: Effect, *, now: datetime | None = None) -> bool:
    """Record a confirmed effect; False when its key was recorded before (nothing changes)."""
    statement = (
        upsert(session, CrmEffect)
        .values(_row(effect, utc(now)))
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
    )
    result = await session.execute(statement)
    return bool(getattr(result, "rowcount", 0))


async def record_many(
    session: AsyncSession, effects: Sequence[Effect], *, now: datetime | None = None
) -> None:
    """Record confirmed effects (recorded keys stay as they are), as one executemany: one
    compiled statement however many there are."""
    if not effects:
        return
    at = utc(now)
    statement = upsert(session, table_of(CrmEffect)).on_conflict_do_nothing(
        index_elements=["idempotency_key"]
    )
    await session.execute(statement, [_row(e, at) for e in effects])


def _row(effect: Effect, at: datetime) -> dict[str, Any]:
    return {
        "idempotency_key": effect.idempotency_key,
        "workflow_id": effect.workflow_id,
        "step_id": effect.step_id,
        "customer_key": effect.customer_key,
        "action": effect.action,
        "target": effect.target,
        "properties": list(effect.properties),
        "crm_id": effect.crm_id,
        "confirmed_at": at,
        "how": effect.how,
    }


async def confirmed_many(
    session: AsyncSession, idempotency_keys: Collection[str]
) -> dict[str, CrmEffect]:
    """The recorded effects among these keys."""
    found: dict[str, CrmEffect] = {}
    for chunk in in_list(list(idempotency_keys)):
        rows = await session.scalars(select(CrmEffect).where(CrmEffect.idempotency_key.in_(chunk)))
        found |= {e.idempotency_key: e for e in rows}
    return found


async def effects_of(session: AsyncSession, workflow_id: str) -> Sequence[CrmEffect]:
    """Every effect one campaign workflow had confirmed, oldest first."""
    rows = await session.scalars(
        select(CrmEffect)
        .where(CrmEffect.workflow_id == workflow_id)
        .order_by(CrmEffect.confirmed_at, CrmEffect.idempotency_key)
    )
    return rows.all()


def ceiling_lock_key(ceiling: str) -> int:
    """The second advisory lock key of a ceiling: a stable signed 32-bit hash."""
    digest = hashlib.sha256(ceiling.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


@dataclass(frozen=True)
class RequestSlot:
    """A slot taken (``id`` set, ``wait`` zero), or how long until one frees; ``used``
    counts the requests in the window before this one."""

    wait: timedelta
    id: int | None = None
    used: int = 0


async def take_request_slot(
    session: AsyncSession,
    ceiling: str,
    limit: int,
    window: timedelta,
    *,
    now: datetime | None = None,
) -> RequestSlot:
    """Take a slot for one request to the CRM behind ``ceiling``, or say how long to wait
    when ``limit`` requests were already counted in the last ``window``.

    Serialised per ceiling: an advisory lock on PostgreSQL, the write lock every SQLite
    transaction holds from its start. The caller sends its request right after committing.
    """
    at = utc(now)
    if dialect_name(session) == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": CEILING_LOCK_SPACE, "key": ceiling_lock_key(ceiling)},
        )
    await session.execute(
        delete(CrmRequest).where(CrmRequest.ceiling == ceiling, CrmRequest.sent_at <= at - window)
    )
    sent, oldest = (
        await session.execute(
            select(func.count(), func.min(CrmRequest.sent_at)).where(CrmRequest.ceiling == ceiling)
        )
    ).one()
    if sent < limit:
        row = CrmRequest(ceiling=ceiling, sent_at=at)
        session.add(row)
        await session.flush()
        return RequestSlot(timedelta(0), row.id, sent)
    # Full: the oldest request leaves the window first. SQLite returns it naive (UTC).
    leaves = utc(oldest if oldest.tzinfo else oldest.replace(tzinfo=at.tzinfo)) + window
    return RequestSlot(max(leaves - at, timedelta(milliseconds=1)), used=sent)


async def request_sent(
    session: AsyncSession, ceiling: str, slot_id: int, *, at: datetime | None = None
) -> None:
    """Count the request in slot ``slot_id`` from ``at``, when it reached the wire (``None``:
    from now, after its answer, which is never earlier than the CRM counted it). The CRM
    counts a request on arrival, so our window never ends before the CRM's does, however long
    the request waited after taking its slot.

    A slot that has already left the window is counted again: the CRM may have counted the
    request later than the window says."""
    await session.execute(delete(CrmRequest).where(CrmRequest.id == slot_id))
    session.add(CrmRequest(ceiling=ceiling, sent_at=utc(at)))


async def requests_in_window(
    session: AsyncSession, ceiling: str, window: timedelta, *, now: datetime | None = None
) -> int:
    """How many requests the ceiling counts in the window ending ``now``."""
    at = utc(now)
    count = await session.scalar(
        select(func.count()).where(CrmRequest.ceiling == ceiling, CrmRequest.sent_at > at - window)
    )
    return int(count or 0)
