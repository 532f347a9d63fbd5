"""Safe default segment assignments: where a campaign puts a customer when it cannot act."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import true
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import upsert, utc
from cohortflow.storage.tables import SegmentAssignment


async def assign_segment(
    session: AsyncSession,
    *,
    workflow_id: str,
    step_id: str,
    campaign_id: str,
    customer_key: str,
    segment: str,
    reason: str,
    crm_synced: bool,
    assigned_at: datetime | None = None,
) -> bool:
    """Record the assignment once per (workflow_id, step_id); True if this call wrote.

    A repeat changes nothing except turning ``crm_synced`` on once the CRM has it too; the
    first segment, reason and time stay.
    """
    stmt = upsert(session, SegmentAssignment).values(
        workflow_id=workflow_id,
        step_id=step_id,
        campaign_id=campaign_id,
        customer_key=customer_key,
        segment=segment,
        reason=reason,
        crm_synced=crm_synced,
        assigned_at=utc(assigned_at),
    )
    written = await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[SegmentAssignment.workflow_id, SegmentAssignment.step_id],
            set_={"crm_synced": true()},
            where=SegmentAssignment.crm_synced.is_(False) & stmt.excluded.crm_synced.is_(True),
        ).returning(SegmentAssignment.workflow_id)
    )
    return written.first() is not None
