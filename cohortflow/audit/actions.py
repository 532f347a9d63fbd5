"""Operator actions on record: who applied a campaign or cohort, promoted a model, or
erased a customer.

They sit in the same chain as the campaigns' decisions, outside any workflow: the row's
``workflow_id`` names what was acted on, its step the action and the time, so the same
action at another moment is another row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage import audit
from cohortflow.storage._sql import utc
from workflows.campaign.contract import AuditKind


async def record_action(
    session: AsyncSession,
    kind: AuditKind,
    subject: str,
    by: str,
    *,
    campaign_id: str = "-",
    customer_key: str = "-",
    now: datetime | None = None,
    **details: Any,
) -> None:
    """Append that ``by`` did ``kind`` to ``subject``, in the caller's transaction."""
    at = utc(now)
    await audit.append_audit(
        session,
        audit.AuditEvent(
            workflow_id=subject,
            step_id=f"{kind.value}:{at.isoformat()}",
            kind=kind,
            campaign_id=campaign_id,
            customer_key=customer_key,
            payload={"by": by, **details},
        ),
        now=at,
    )
