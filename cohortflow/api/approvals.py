"""Approvals over HTTP: the queue, and one decision as the token's identity."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, field_validator

from cohortflow.api.auth import Who, guard
from cohortflow.api.deps import Ctl, StrictBody
from cohortflow.auth import policy
from cohortflow.campaigns.bulk import ApprovalFilter, decide_all, matching
from cohortflow.spec import parse_duration


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
    escalated_at: datetime | None = Field(
        None, description="When the request was escalated, unanswered, ahead of its expiry."
    )


class ContextOut(BaseModel):
    """One approval with what it takes to decide it: cohort, campaign version, the model
    versions and top contributions behind its scores, the CRM writes it would allow."""

    approval: ApprovalOut
    cohort_id: str
    campaign_version: int
    model_versions: dict[str, str]
    top_contributions: dict[str, list[dict[str, Any]]]
    proposed: list[dict[str, Any]]
    waited_seconds: float
    expires_in_seconds: float


class DecisionOut(BaseModel):
    """What became of a decision; ``remaining`` approvals are still needed when not 0."""

    approval_id: str
    decision: Literal["approved", "rejected"]
    remaining: int


class BulkDecisionIn(StrictBody):
    """One decision for every pending approval the filter matches."""

    decision: Literal["approve", "reject"]
    reason: str = Field(min_length=1, max_length=1000)
    campaign_id: str | None = Field(None, min_length=1, max_length=64)
    cohort_id: str | None = Field(None, min_length=1, max_length=64)
    score: str | None = Field(None, min_length=1, max_length=64)
    min_score: float | None = None
    max_score: float | None = None
    older_than: str | None = Field(None, description="ISO-8601 duration, e.g. PT2H.")

    @field_validator("older_than")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    def criteria(self) -> ApprovalFilter:
        """The filter this body describes."""
        return ApprovalFilter(
            campaign_id=self.campaign_id,
            cohort_id=self.cohort_id,
            score=self.score,
            min_score=self.min_score,
            max_score=self.max_score,
            older_than=parse_duration(self.older_than) if self.older_than else None,
        )


class BulkDecisionOut(BaseModel):
    """How many matched, were decided, refused by validation (with why) or already decided."""

    matched: int
    decided: int
    refused: int
    already_decided: int
    refusals: dict[str, int]


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

    @router.get("/{approval_id}", **guard(policy.READ, "read approvals", {404: "unknown"}))
    async def show(approval_id: str, ctl: Ctl, who: Who) -> ContextOut:
        """One approval and its context."""
        found = await ctl.approval_context(who, approval_id)
        return ContextOut(
            approval=ApprovalOut.model_validate(found.approval, from_attributes=True),
            cohort_id=found.cohort_id,
            campaign_version=found.campaign_version,
            model_versions=found.model_versions,
            top_contributions=found.top_contributions,
            proposed=[dataclasses.asdict(p) for p in found.proposed],
            waited_seconds=found.waited_seconds,
            expires_in_seconds=found.expires_in_seconds,
        )

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

    @router.post(
        "/decisions",
        **guard(
            policy.DECIDE,
            "decide approvals",
            {
                404: "unknown campaign_id",
                422: "malformed body or filter",
                503: "Temporal or the campaign worker is not reachable",
            },
        ),
    )
    async def decide_many(body: BulkDecisionIn, ctl: Ctl, who: Who) -> BulkDecisionOut:
        """Decide every pending approval matching the filter, each through its own campaign
        with the same checks as one decision and its own audit row. Calling it again after
        an interruption decides only what is still pending."""
        rows = await matching(ctl, who, body.criteria())
        summary = await decide_all(
            ctl, who, rows, approve=body.decision == "approve", reason=body.reason
        )
        return BulkDecisionOut(**dataclasses.asdict(summary))

    return router
