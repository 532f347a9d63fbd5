"""Facts every outbound action is checked against, read from the store: how many outbound
actions a customer had recently or has in flight (the frequency cap) and which time zone
they live in.

Shared by the ``crm_write`` and ``plan_local_time`` activities and by ``campaign preview``,
so a preview applies exactly the rules the campaign will.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import and_, exists, func, not_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow import schedule
from cohortflow.storage import customers
from cohortflow.storage._sql import utc
from cohortflow.storage.tables import AuditRow, OutboundReservation

OUTBOUND_KIND = "crm_written"  # the audit row an outbound action leaves once the CRM took it


async def outbound_since(
    session: AsyncSession,
    customer_key: str,
    since: datetime,
    *,
    exclude: tuple[str, str] | None,
    now: datetime | None = None,
) -> int:
    """Outbound actions of every campaign for this customer since ``since``: those the CRM
    took (``crm_written`` audit rows) plus those in flight (reservations live at ``now``,
    the current time by default; see ``cohortflow.storage.reservations``).

    An action with both a written row and a reservation counts once. ``exclude`` is one
    (workflow, step) whose own action is not counted against itself.
    """
    written = select(func.count()).where(
        AuditRow.customer_key == customer_key,
        AuditRow.kind == OUTBOUND_KIND,
        # Rows store created_at as fixed-format ISO-8601 UTC text, so text order is time order.
        AuditRow.created_at >= since.isoformat(timespec="microseconds"),
    )
    in_flight = select(func.count()).where(
        OutboundReservation.customer_key == customer_key,
        OutboundReservation.expires_at > utc(now),
        not_(
            exists().where(
                AuditRow.workflow_id == OutboundReservation.workflow_id,
                AuditRow.step_id == OutboundReservation.step_id,
                AuditRow.kind == OUTBOUND_KIND,
            )
        ),
    )
    if exclude is not None:
        written = written.where(
            not_(and_(AuditRow.workflow_id == exclude[0], AuditRow.step_id == exclude[1]))
        )
        in_flight = in_flight.where(
            not_(
                and_(
                    OutboundReservation.workflow_id == exclude[0],
                    OutboundReservation.step_id == exclude[1],
                )
            )
        )
    # One statement, so one snapshot: on PostgreSQL's READ COMMITTED, two statements could
    # straddle the commit that swaps a reservation for its written row and miss it in both.
    total = select(written.scalar_subquery() + in_flight.scalar_subquery())
    return int(await session.scalar(total) or 0)


async def already_written(session: AsyncSession, workflow_id: str, step_id: str) -> bool:
    """Whether this (workflow, step)'s action already reached the CRM (a retry of it)."""
    found = await session.scalar(
        select(func.count()).where(
            AuditRow.workflow_id == workflow_id,
            AuditRow.step_id == step_id,
            AuditRow.kind == OUTBOUND_KIND,
        )
    )
    return bool(found)


async def customer_zone(session: AsyncSession, customer_key: str, default: str) -> ZoneInfo:
    """The customer's zone: ``attributes.timezone``, else the ``timezone`` column, else
    ``default`` (also when the stored name is not a zone)."""
    customer = await customers.get_customer(session, customer_key)
    name = ""
    if customer is not None:
        name = str(customer.attributes.get("timezone") or customer.timezone or "")
    return schedule.zone(name, default)
