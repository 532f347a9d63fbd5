"""Outbound actions as the frequency cap counts them: written (an audit row of the kind the
caller names, the CRM took the action) plus in flight (a live reservation, see
``cohortflow.storage.reservations``).

Shared by the ``crm_write`` activity and ``campaign preview``, so a preview applies exactly
the rules the campaign will. Callers pass the written kind (``AuditKind.CRM_WRITTEN``):
storage knows tables, not the campaign's vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import and_, exists, func, not_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import in_list, utc
from cohortflow.storage.tables import AuditRow, OutboundReservation


async def outbound_since(
    session: AsyncSession,
    customer_key: str,
    since: datetime,
    *,
    written_kind: str,
    exclude: tuple[str, str] | None,
    now: datetime | None = None,
) -> int:
    """Outbound actions of every campaign for this customer since ``since``: those the CRM
    took (``written_kind`` audit rows) plus those in flight (reservations live at ``now``,
    the current time by default).

    An action with both a written row and a reservation counts once. ``exclude`` is one
    (workflow, step) whose own action is not counted against itself.
    """
    written = select(func.count()).where(
        AuditRow.customer_key == customer_key,
        AuditRow.kind == written_kind,
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
                AuditRow.kind == written_kind,
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


async def already_written(
    session: AsyncSession, workflow_id: str, step_id: str, *, written_kind: str
) -> bool:
    """Whether this (workflow, step)'s action already reached the CRM (a retry of it): it has
    a ``written_kind`` audit row."""
    found = await session.scalar(
        select(func.count()).where(
            AuditRow.workflow_id == workflow_id,
            AuditRow.step_id == step_id,
            AuditRow.kind == written_kind,
        )
    )
    return bool(found)


async def written_many(
    session: AsyncSession, actions: Collection[tuple[str, str]], *, written_kind: str
) -> set[tuple[str, str]]:
    """Which of these (workflow, step) actions already reached the CRM."""
    # By the workflow's index alone (row-value IN lists defeat PostgreSQL's planner).
    found: set[tuple[str, str]] = set()
    for chunk in in_list(sorted({workflow_id for workflow_id, _ in actions})):
        rows = await session.execute(
            select(AuditRow.workflow_id, AuditRow.step_id).where(
                AuditRow.workflow_id.in_(chunk), AuditRow.kind == written_kind
            )
        )
        found |= {(w, s) for w, s in rows if (w, s) in actions}
    return found
