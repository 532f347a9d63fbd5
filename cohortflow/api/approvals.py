"""Approvals over HTTP: the queue, and one decision as the token's identity."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from cohortflow.api.auth import Who, guard
from cohortflow.api.deps import Ctl, StrictBody
from cohortflow.auth import policy


class DecisionIn(StrictBody):
    """A decision on an approval; who decides is the token's identity, never a field."""

    decision: Literal["approve", "reject"]
    reason: str = Field(min_length=1, max_length=1000)


class ApprovalOut(BaseModel):
    """A pending or decided approval."""

    approval_id: str
    workflow_id: str
    campaign_id: str
    customer_key: str
    reason: str
    scores: dict[str, Any]
    status: str
    requested_at: datetime
    expires_at: datetime
    approved_by: list[str]
    decided_by: str | None
    decision_reason: str | None


class DecisionOut(BaseModel):
    """What became of a decision; ``remaining`` approvals are still needed when not 0."""

    approval_id: str
    decision: Literal["approved", "rejected"]
    remaining: int


def approvals_router() -> APIRouter:
    """``GET /v1/approvals`` and ``POST /v1/approvals/{approval_id}/decision``."""
    router = APIRouter(prefix="/v1/approvals", tags=["approvals"])

    @router.get("", **guard(policy.READ, "read approvals", {404: "unknown campaign_id"}))
    async def list_approvals(
        ctl: Ctl,
        who: Who,
        status: Annotated[
            Literal["pending", "approved", "rejected", "expired", "all"], Query()
        ] = "pending",
        campaign_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    ) -> list[ApprovalOut]:
        """Approvals, newest first, optionally of one campaign."""
        rows = await ctl.list_approvals(who, None if status == "all" else status, campaign_id)
        return [ApprovalOut.model_validate(r, from_attributes=True) for r in rows]

    @router.post(
        "/{approval_id}/decision",
        **guard(
            policy.DECIDE,
            "decide approvals",
            {
                404: "unknown approval",
                409: "not pending: already decided, expired or withdrawn",
                422: "malformed body (a field naming the operator is refused)",
                503: "Temporal or the campaign worker is not reachable",
            },
        ),
    )
    async def decide(approval_id: str, body: DecisionIn, ctl: Ctl, who: Who) -> DecisionOut:
        """Approve or reject as the token's identity. 403 when the four-eyes rules, the
        spec's roles or the token's scope forbid it (own campaign version, owner, not a
        listed approver, approved already)."""
        result = await ctl.decide(
            approval_id, approve=body.decision == "approve", identity=who, reason=body.reason
        )
        return DecisionOut(
            approval_id=result.approval_id,
            decision="approved" if result.decision == "approved" else "rejected",
            remaining=result.remaining,
        )

    return router
