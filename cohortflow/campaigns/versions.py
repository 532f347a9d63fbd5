"""Applying a campaign spec: a new version when it changed, on record with who applied it."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.audit.actions import record_action
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns
from workflows.campaign.contract import AuditKind


async def applied(session: AsyncSession, spec: CampaignSpec, by: str) -> tuple[int, bool]:
    """Store ``spec`` as its campaign's next version unless unchanged, in the caller's
    transaction; a new version is audited as applied by ``by``. ``(version, created)``."""
    document = spec.model_dump(mode="json")
    version, created = await campaigns.save_spec_version(
        session, spec.campaign_id, document, created_by=by
    )
    if created:
        await record_action(
            session,
            AuditKind.CAMPAIGN_APPLIED,
            f"campaign:{spec.campaign_id}",
            by,
            campaign_id=spec.campaign_id,
            version=version,
            sha256=campaigns.spec_hash(document),
        )
    return version, created
