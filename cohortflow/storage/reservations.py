"""Outbound reservations: the slot an outbound action holds under the frequency cap while its
CRM call is in flight.

The cap counts a customer's recorded outbound actions (``crm_written`` audit rows) plus these
reservations (see ``cohortflow.storage.outbound.outbound_since``). Checking the cap and
reserving happen in one transaction serialised per customer, and the reservation is removed in
the transaction that appends the action's ``crm_written`` row, so concurrent campaigns cannot
both take the last slot and no action is ever counted twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import dialect_name, in_list, table_of, upsert, utc
from cohortflow.storage.tables import OutboundReservation

# The first key of PostgreSQL's two-key advisory locks ("coob" in ASCII). Two-key locks live
# in a key space apart from the one-key locks of the audit chain and of migrations, so a
# customer's lock can never be the audit lock by a hash collision.
OUTBOUND_LOCK_SPACE = 0x636F6F62


@dataclass(frozen=True)
class Held:
    """An action's slot to hold until ``expires_at``."""

    workflow_id: str
    step_id: str
    campaign_id: str
    customer_key: str
    expires_at: datetime


def customer_lock_key(customer_key: str) -> int:
    """The second advisory lock key of ``customer_key``: a stable signed 32-bit hash.

    Two customers sharing a key only wait for each other; they are never miscounted.
    """
    digest = hashlib.sha256(customer_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


async def lock_customer(session: AsyncSession, customer_key: str) -> None:
    """Serialise, until the caller's transaction ends, every transaction that counts or
    changes this customer's outbound actions.

    PostgreSQL: a transaction-scoped advisory lock per customer. SQLite: nothing to do, as
    every ``Database.transaction()`` holds the database's write lock from its first
    statement (``BEGIN IMMEDIATE``, see ``db.create_engine``), the same guarantee the audit
    chain relies on. Take it before appending to the audit chain (whose lock is global), so
    every transaction takes the two in one order and none can deadlock.
    """
    if dialect_name(session) == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": OUTBOUND_LOCK_SPACE, "key": customer_lock_key(customer_key)},
        )


async def lock_customers(session: AsyncSession, customer_keys: Collection[str]) -> None:
    """:func:`lock_customer` for many customers at once, in one order every transaction
    follows (sorted lock keys), so two transactions locking overlapping sets never deadlock."""
    if dialect_name(session) != "postgresql" or not customer_keys:
        return
    lock_keys = sorted({customer_lock_key(k) for k in customer_keys})
    await session.execute(
        text(
            "SELECT pg_advisory_xact_lock(:space, k) "
            "FROM (SELECT unnest(CAST(:keys AS integer[])) AS k ORDER BY 1) AS ordered"
        ),
        {"space": OUTBOUND_LOCK_SPACE, "keys": lock_keys},
    )


async def expiries(
    session: AsyncSession, actions: Collection[tuple[str, str]]
) -> dict[tuple[str, str], datetime]:
    """When the reservations of these (workflow, step) actions expire, where one exists."""
    # By the workflow's index alone (row-value IN lists defeat PostgreSQL's planner).
    found: dict[tuple[str, str], datetime] = {}
    columns = (OutboundReservation.workflow_id, OutboundReservation.step_id)
    for chunk in in_list(sorted({workflow_id for workflow_id, _ in actions})):
        rows = await session.execute(
            select(*columns, OutboundReservation.expires_at).where(columns[0].in_(chunk))
        )
        found |= {
            (w, s): utc(e if e.tzinfo else e.replace(tzinfo=UTC))
            for w, s, e in rows
            if (w, s) in actions
        }
    return found


async def get_reservation(
    session: AsyncSession, workflow_id: str, step_id: str
) -> OutboundReservation | None:
    """The reservation of one (workflow, step)'s action, live or expired, if there is one."""
    return await session.get(OutboundReservation, (workflow_id, step_id))


async def reserve(
    session: AsyncSession,
    *,
    workflow_id: str,
    step_id: str,
    campaign_id: str,
    customer_key: str,
    expires_at: datetime,
    now: datetime | None = None,
) -> None:
    """Hold (or keep holding, until ``expires_at``) a slot for this (workflow, step)'s action.

    Call it under :func:`lock_customer`, after the cap check, in the same transaction. A
    repeat for the same action moves ``expires_at`` and keeps the first ``reserved_at``. The
    customer's expired reservations are removed on the way, so they do not pile up.
    """
    reserved_at = utc(now)
    await session.execute(
        delete(OutboundReservation).where(
            OutboundReservation.customer_key == customer_key,
            OutboundReservation.expires_at <= reserved_at,
        )
    )
    stmt = upsert(session, OutboundReservation).values(
        workflow_id=workflow_id,
        step_id=step_id,
        campaign_id=campaign_id,
        customer_key=customer_key,
        reserved_at=reserved_at,
        expires_at=utc(expires_at),
    )
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[OutboundReservation.workflow_id, OutboundReservation.step_id],
            set_={"expires_at": stmt.excluded.expires_at},
        )
    )


async def reserve_many(
    session: AsyncSession, held: Sequence[Held], *, now: datetime | None = None
) -> None:
    """:func:`reserve` for many actions at once (their customers locked, their caps checked)."""
    if not held:
        return
    reserved_at = utc(now)
    customers = sorted({h.customer_key for h in held})
    for chunk in in_list(customers):
        await session.execute(
            delete(OutboundReservation).where(
                OutboundReservation.customer_key.in_(chunk),
                OutboundReservation.expires_at <= reserved_at,
            )
        )
    rows = [
        {
            "workflow_id": h.workflow_id,
            "step_id": h.step_id,
            "campaign_id": h.campaign_id,
            "customer_key": h.customer_key,
            "reserved_at": reserved_at,
            "expires_at": utc(h.expires_at),
        }
        for h in held
    ]
    # One executemany: one compiled statement however many rows.
    stmt = upsert(session, table_of(OutboundReservation))
    stmt = stmt.on_conflict_do_update(
        index_elements=[OutboundReservation.workflow_id, OutboundReservation.step_id],
        set_={"expires_at": stmt.excluded.expires_at},
    )
    await session.execute(stmt, rows)


async def release_many(session: AsyncSession, actions: Collection[tuple[str, str]]) -> None:
    """:func:`release` for many (workflow, step) actions at once."""
    for chunk in in_list(list(actions)):
        await session.execute(
            delete(OutboundReservation).where(
                tuple_(OutboundReservation.workflow_id, OutboundReservation.step_id).in_(chunk)
            )
        )


async def release(session: AsyncSession, workflow_id: str, step_id: str) -> bool:
    """Remove this (workflow, step)'s reservation; True if there was one.

    Either the action was recorded (its ``crm_written`` row now counts it) or it ended
    without a write and must stop counting.
    """
    removed = await session.execute(
        delete(OutboundReservation)
        .where(
            OutboundReservation.workflow_id == workflow_id,
            OutboundReservation.step_id == step_id,
        )
        .returning(OutboundReservation.workflow_id)
    )
    return removed.first() is not None


async def live_reservations(
    session: AsyncSession, customer_key: str, now: datetime | None = None
) -> list[OutboundReservation]:
    """The customer's unexpired reservations, oldest first."""
    result = await session.scalars(
        select(OutboundReservation)
        .where(
            OutboundReservation.customer_key == customer_key,
            OutboundReservation.expires_at > utc(now),
        )
        .order_by(OutboundReservation.reserved_at)
    )
    return list(result)
