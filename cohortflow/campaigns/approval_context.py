"""What an operator needs to decide one approval, gathered from what the campaign recorded.

Nothing here asks the workflow: the approval row, the campaign entry (cohort, version), the
audit row of the customer's scoring (model versions, top contributions) and the spec version
(the CRM actions the campaign would take next) are all in the database already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cohortflow.errors import NotFound
from cohortflow.storage import approvals, audit, campaigns
from cohortflow.storage.db import Database
from cohortflow.storage.tables import Approval, CampaignEntry
from workflows.campaign.contract import AuditKind


@dataclass(frozen=True)
class ProposedAction:
    """One CRM write the campaign would make once approved."""

    step_id: str
    action: str  # set_properties | enroll_sequence | add_to_list | ...
    target: str  # the sequence or list, "" for properties
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ApprovalContext:
    """One approval request with everything needed to decide it."""

    approval: Approval
    cohort_id: str
    campaign_version: int
    model_versions: dict[str, str]
    top_contributions: dict[str, list[dict[str, Any]]]
    proposed: list[ProposedAction]
    waited_seconds: float
    expires_in_seconds: float


async def approval_context(
    db: Database, approval_id: str, now: datetime | None = None
) -> ApprovalContext:
    """The context of ``approval_id``; :class:`NotFound` for an unknown id."""
    at = now or datetime.now(UTC)
    async with db.read_transaction() as session:
        row = await approvals.get_approval(session, approval_id)
        if row is None:
            raise NotFound(f"approval_id: no approval {approval_id!r}", field="approval_id")
        entry = await session.get(CampaignEntry, row.workflow_id)
        version = entry.version if entry is not None else 0
        spec = await campaigns.get_spec(session, row.campaign_id, version) if version else None
        trail = await audit.audit_for_workflow(session, row.workflow_id)
    scored: dict[str, Any] = next(
        (json.loads(r.payload) for r in trail if r.kind == AuditKind.SCORED), {}
    )
    return ApprovalContext(
        approval=row,
        cohort_id=entry.cohort_id if entry is not None else "",
        campaign_version=version,
        model_versions=dict(scored.get("model_versions", {})),
        top_contributions=dict(scored.get("top_contributions", {})),
        proposed=proposed_actions(spec or {}, row.step_id),
        waited_seconds=(at - row.requested_at).total_seconds(),
        expires_in_seconds=(row.expires_at - at).total_seconds(),
    )


def proposed_actions(spec: dict[str, Any], approval_step: str) -> list[ProposedAction]:
    """The CRM steps that follow ``approval_step`` in the spec, in order."""
    steps = spec.get("steps", [])
    ids = [s.get("id") for s in steps]
    after = steps[ids.index(approval_step) + 1 :] if approval_step in ids else []
    return [
        ProposedAction(
            step_id=str(s["id"]),
            action=str(s.get("action", "")),
            target=str(s.get("sequence_id") or s.get("list_id") or ""),
            properties=dict(s.get("properties") or {}),
        )
        for s in after
        if s.get("type") == "crm"
    ]
