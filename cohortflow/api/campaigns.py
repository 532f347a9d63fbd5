"""Campaign controls and consent corrections over HTTP."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from cohortflow.api.auth import Who, guard
from cohortflow.api.deps import Ctl, StrictBody
from cohortflow.auth import policy
from cohortflow.campaigns.controls import CampaignAction


class CampaignActionIn(StrictBody):
    """Why a campaign is paused, resumed or cancelled (who: the token's identity)."""

    reason: str = Field("", max_length=1000)


class CampaignOut(BaseModel):
    """The campaign's status after the action, and how many running workflows were told."""

    campaign_id: str
    status: str
    workflows: int


class ConsentIn(StrictBody):
    """A consent correction for a source customer id."""

    customer_id: str = Field(min_length=1, max_length=200)
    channel: str = Field(min_length=1, max_length=32)
    purpose: str = Field(min_length=1, max_length=64)
    granted: bool
    source: str = Field("api", min_length=1, max_length=64)
    # The evidence: which policy version, or which text, the customer agreed to or refused.
    policy_version: str | None = Field(None, min_length=1, max_length=64)
    text: str | None = Field(None, min_length=1, max_length=10_000)


_ERRORS = {404: "unknown campaign", 409: "the campaign is cancelled"}


def campaigns_router() -> APIRouter:
    """Pause, resume and cancel a campaign; correct a customer's consent."""
    router = APIRouter(tags=["campaigns"])

    async def act(
        ctl: Ctl, who: Who, campaign_id: str, action: CampaignAction, reason: str
    ) -> CampaignOut:
        outcome = await ctl.change_campaign(campaign_id, action, identity=who, reason=reason)
        return CampaignOut(
            campaign_id=outcome.campaign_id, status=outcome.status, workflows=outcome.workflows
        )

    @router.post("/v1/campaigns/{campaign_id}/pause", **guard(policy.PAUSE, "pause", _ERRORS))
    async def pause(campaign_id: str, body: CampaignActionIn, ctl: Ctl, who: Who) -> CampaignOut:
        """Hold every outbound action of the campaign's running workflows."""
        return await act(ctl, who, campaign_id, "pause", body.reason)

    @router.post("/v1/campaigns/{campaign_id}/resume", **guard(policy.PAUSE, "resume", _ERRORS))
    async def resume(campaign_id: str, body: CampaignActionIn, ctl: Ctl, who: Who) -> CampaignOut:
        """Let a paused campaign act again."""
        return await act(ctl, who, campaign_id, "resume", body.reason)

    @router.post("/v1/campaigns/{campaign_id}/cancel", **guard(policy.ADMIN, "cancel", _ERRORS))
    async def cancel(campaign_id: str, body: CampaignActionIn, ctl: Ctl, who: Who) -> CampaignOut:
        """Cancel: running workflows exit, no new outbound action is made."""
        return await act(ctl, who, campaign_id, "cancel", body.reason)

    @router.post(
        "/v1/consent",
        tags=["consent"],
        **guard(policy.ADMIN, "correct consent", {404: "unknown customer"}),
    )
    async def set_consent(body: ConsentIn, ctl: Ctl, who: Who) -> dict[str, Any]:
        """Grant or revoke consent; running campaigns of the customer are told at once
        (``signalled_campaigns``), or, while Temporal is unreachable (``temporal``), once it
        is back."""
        outcome = await ctl.set_consent(
            body.customer_id,
            channel=body.channel,
            purpose=body.purpose,
            granted=body.granted,
            source=body.source,
            identity=who,
            how="api",
            policy_version=body.policy_version,
            text=body.text,
        )
        return {
            "customer_key": outcome.customer_key,
            "changed": outcome.changed,
            "signalled_campaigns": outcome.signalled,
            "temporal": outcome.temporal,
        }

    return router
