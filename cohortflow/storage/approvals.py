"""Approvals campaigns wait for: requested once, decided once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import upsert, utc
from cohortflow.storage.tables import Approval

Decision = Literal["approved", "rejected", "expired"]
DECISIONS: frozenset[str] = frozenset(get_args(Decision))


class ApprovalNotFound(LookupError):
    """No approval has this id."""


class ApprovalAlreadyDecided(RuntimeError):
    """The approval already has a different final status."""

    def __init__(self, approval_id: str, status: str) -> None:
        super().__init__(f"approval {approval_id!r} is already {status}")
        self.approval_id = approval_id
        self.status = status


async def add_pending(
    session: AsyncSession,
    *,
    approval_id: str,
    workflow_id: str,
    step_id: str,
    campaign_id: str,
    customer_key: str,
    reason: str,
    scores: dict[str, Any],
    requested_at: datetime,
    expires_at: datetime,
) -> bool:
    """Record a pending approval; False if ``approval_id`` already exists (left as it is)."""
    inserted = await session.execute(
        upsert(session, Approval)
        .values(
            approval_id=approval_id,
            workflow_id=workflow_id,
            step_id=step_id,
            campaign_id=campaign_id,
            customer_key=customer_key,
            reason=reason,
            scores=scores,
            status="pending",
            requested_at=utc(requested_at),
            expires_at=utc(expires_at),
        )
        .on_conflict_do_nothing(index_elements=[Approval.approval_id])
        .returning(Approval.approval_id)
    )
    return inserted.first() is not None


async def get_approval(session: AsyncSession, approval_id: str) -> Approval | None:
    """The approval, or None."""
    return await session.get(Approval, approval_id)


async def list_approvals(
    session: AsyncSession, status: str | None = "pending", campaign_id: str | None = None
) -> list[Approval]:
    """Approvals with ``status`` (None: any), optionally of one campaign, oldest first."""
    query = select(Approval).order_by(Approval.requested_at, Approval.approval_id)
    if status is not None:
        query = query.where(Approval.status == status)
    if campaign_id is not None:
        query = query.where(Approval.campaign_id == campaign_id)
    return list(await session.scalars(query))


async def mark_decided(
    session: AsyncSession,
    approval_id: str,
    *,
    status: Decision,
    operator: str | None,
    reason: str | None,
    decided_at: datetime,
) -> bool:
    """Move a pending approval to its final status; True if this call decided it.

    Deciding again with the same final status returns False (a retried activity or a
    repeated request); a different final status raises :class:`ApprovalAlreadyDecided`, an
    unknown id :class:`ApprovalNotFound`. The conditional UPDATE makes concurrent deciders
    race safely: exactly one wins.
    """
    if status not in DECISIONS:
        raise ValueError(f"unknown decision {status!r}")
    decided = await session.execute(
        update(Approval)
        .where(Approval.approval_id == approval_id, Approval.status == "pending")
        .values(
            status=status,
            decided_by=operator,
            decided_at=utc(decided_at),
            decision_reason=reason,
        )
        .returning(Approval.approval_id)
    )
    if decided.first() is not None:
        return True
    current = await session.scalar(
        select(Approval.status).where(Approval.approval_id == approval_id)
    )
    if current is None:
        raise ApprovalNotFound(approval_id)
    if current == status:
        return False
    raise ApprovalAlreadyDecided(approval_id, current)


async def mark_escalated(session: AsyncSession, approval_id: str, at: datetime) -> None:
    """Note when a request's escalation notice went out (the first time counts: a retried
    activity changes nothing)."""
    await session.execute(
        update(Approval)
        .where(Approval.approval_id == approval_id, Approval.escalated_at.is_(None))
        .values(escalated_at=utc(at))
    )


@dataclass(frozen=True)
class DecisionNote:
    """A decision its campaign confirmed, for the approval's record: final when ``status``
    is set, else one more approver of several."""

    approval_id: str
    operator: str
    reason: str
    status: Decision | None
    decided_at: datetime


async def note_decisions(
    session: AsyncSession, notes: Sequence[DecisionNote]
) -> list[ApprovalAlreadyDecided | ApprovalNotFound | None]:
    """Put each note on its approval's record (``mark_decided`` or ``add_approver``); per
    note, what ``mark_decided`` would have raised, or None. Concurrent decisions share one
    transaction this way (``storage.group_commit``) without one note failing the others."""
    outcomes: list[ApprovalAlreadyDecided | ApprovalNotFound | None] = []
    for note in notes:
        try:
            if note.status is None:
                await add_approver(session, note.approval_id, note.operator)
            else:
                await mark_decided(
                    session,
                    note.approval_id,
                    status=note.status,
                    operator=note.operator,
                    reason=note.reason,
                    decided_at=note.decided_at,
                )
            outcomes.append(None)
        except (ApprovalAlreadyDecided, ApprovalNotFound) as exc:
            outcomes.append(exc)
    return outcomes


async def add_approver(session: AsyncSession, approval_id: str, name: str) -> None:
    """Note one more approver of a pending approval that needs several (for display: the
    workflow's own record of who approved is what counts)."""
    row = await session.get(Approval, approval_id, with_for_update=True)
    if row is not None and name not in row.approved_by:
        row.approved_by = [*row.approved_by, name]
