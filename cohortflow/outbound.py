"""Facts every outbound action is checked against, read from the store: how many outbound
actions a customer had recently (the frequency cap) and which time zone they live in.

Shared by the ``crm_write`` and ``plan_local_time`` activities and by ``campaign preview``,
so a preview applies exactly the rules the campaign will.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, not_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow import schedule
from cohortflow.storage import customers
from cohortflow.storage.tables import AuditRow

OUTBOUND_KIND = "crm_written"  # the audit row an outbound action leaves once the CRM took it


async def outbound_since(
    session: AsyncSession, customer_key: str, since: datetime, *, exclude: tuple[str, str] | None
) -> int:
    """Outbound actions of every campaign for this customer since ``since``.

    ``exclude`` is one (workflow, step) whose own action is not counted against itself.
    """
    query = select(func.count()).where(
        AuditRow.customer_key == customer_key,
        AuditRow.kind == OUTBOUND_KIND,
        # Rows store created_at as fixed-format ISO-8601 UTC text, so text order is time order.
        AuditRow.created_at >= since.isoformat(timespec="microseconds"),
    )
    if exclude is not None:
        query = query.where(
            not_(and_(AuditRow.workflow_id == exclude[0], AuditRow.step_id == exclude[1]))
        )
    return int(await session.scalar(query) or 0)


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
