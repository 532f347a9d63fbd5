"""The audit side of campaign activities: the decisions a workflow made, on record.

``record_audit`` appends one decision (and the approval row it changes) as a local activity;
every other activity appends the decisions that ride with it (``append_decisions``) in its
own transaction. Rows are unique on (workflow, step, kind), so a retry appends nothing twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from cohortflow.storage import approvals, audit
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import AuditInput, AuditResult, Decision
from workflows.campaign.contract import ActivityName, AuditKind

# The approval status each closing audit kind leaves behind.
_CLOSED = {
    AuditKind.APPROVAL_EXPIRED: "expired",
    AuditKind.APPROVAL_WITHDRAWN: "expired",
}


async def append_row(
    session: AsyncSession,
    workflow_id: str,
    step_id: str,
    kind: str,
    campaign_id: str,
    customer_key: str,
    payload: dict[str, Any],
) -> audit.Appended:
    """Append one audit row of a campaign workflow (nothing if it is there already)."""
    return await audit.append_audit(
        session,
        audit.AuditEvent(
            workflow_id=workflow_id,
            step_id=step_id,
            kind=kind,
            campaign_id=campaign_id,
            customer_key=customer_key,
            payload=payload,
        ),
    )


async def append_decisions(
    session: AsyncSession,
    workflow_id: str,
    campaign_id: str,
    customer_key: str,
    decisions: list[Decision],
) -> None:
    """Append the decisions an activity carries, in the order the workflow made them."""
    for decision in decisions:
        await append_row(
            session,
            workflow_id,
            decision.step_id,
            decision.kind,
            campaign_id,
            customer_key,
            decision.payload,
        )


class AuditActivities:
    """Records decisions the workflow makes itself (local activity)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @activity.defn(name=ActivityName.RECORD_AUDIT)
    async def record_audit(self, inp: AuditInput) -> AuditResult:
        """Append a decision the workflow made; approval rows change in the same transaction."""
        async with self._db.transaction() as session:
            await append_decisions(
                session, inp.workflow_id, inp.campaign_id, inp.customer_key, inp.decisions
            )
            appended = await append_row(
                session,
                inp.workflow_id,
                inp.step_id,
                inp.kind,
                inp.campaign_id,
                inp.customer_key,
                inp.payload,
            )
            await _approval_row(session, inp)
        return AuditResult(seq=appended.seq, created=appended.created)


async def _approval_row(session: AsyncSession, inp: AuditInput) -> None:
    """Open the approval row on a request; close it on a decision, expiry or withdrawal."""
    pending = inp.approval
    if pending is None:
        return
    if inp.kind == AuditKind.APPROVAL_REQUESTED:
        scores = inp.payload.get("scores", {})
        await approvals.add_pending(
            session,
            approval_id=pending.approval_id,
            workflow_id=inp.workflow_id,
            step_id=inp.step_id,
            campaign_id=inp.campaign_id,
            customer_key=inp.customer_key,
            reason=pending.reason,
            scores=scores if isinstance(scores, dict) else {},
            requested_at=datetime.fromisoformat(pending.requested_at),
            expires_at=datetime.fromisoformat(pending.expires_at),
        )
        return
    if inp.kind == AuditKind.APPROVAL_DECIDED:
        status = "approved" if inp.payload.get("approve") else "rejected"
    elif inp.kind in _CLOSED:
        status = _CLOSED[AuditKind(inp.kind)]
    else:
        return
    operator = inp.payload.get("operator")
    reason = inp.payload.get("reason") or inp.payload.get("why")
    try:
        await approvals.mark_decided(
            session,
            pending.approval_id,
            status=status,  # type: ignore[arg-type]
            operator=str(operator) if operator else None,
            reason=str(reason) if reason else None,
            decided_at=activity.info().current_attempt_scheduled_time,
        )
    except (approvals.ApprovalAlreadyDecided, approvals.ApprovalNotFound) as exc:
        raise ApplicationError(str(exc), non_retryable=True) from exc
