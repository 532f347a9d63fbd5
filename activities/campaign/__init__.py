"""The campaign's activities, by concern: the spec, scoring, the CRM gate and write, audit,
escalation notices, the safe default segment, local time. Each is idempotent, takes one
dataclass and returns one, and knows nothing of who hosts it (``workers/`` puts them on task
queues).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from activities.campaign.audit import AuditActivities
from activities.campaign.batcher import CrmBatcher
from activities.campaign.crm import CrmActivities
from activities.campaign.escalation import EscalationActivities, EscalationWebhook
from activities.campaign.fallback import FallbackActivities
from activities.campaign.local_time import LocalTimeActivities
from activities.campaign.scoring import ScoringActivities
from activities.campaign.spec import SpecActivities
from cohortflow.storage.db import Database
from scoring.scorer import Scorer


@dataclass(frozen=True)
class CampaignActivities:
    """Every campaign activity, each bound to what it needs."""

    spec: SpecActivities
    scoring: ScoringActivities
    audit: AuditActivities
    local_time: LocalTimeActivities
    crm: CrmActivities
    fallback: FallbackActivities
    escalation: EscalationActivities

    @classmethod
    def build(
        cls,
        db: Database,
        scorer: Scorer,
        batcher: CrmBatcher,
        *,
        crm_type: type[CrmActivities] = CrmActivities,
        owned_properties: Collection[str] = ("*",),
        sender_email: str = "",
        webhook: EscalationWebhook | None = None,
    ) -> CampaignActivities:
        """Bind every activity to the database, the scorer and the process's CRM batcher."""
        return cls(
            spec=SpecActivities(db),
            scoring=ScoringActivities(db, scorer),
            audit=AuditActivities(db),
            local_time=LocalTimeActivities(db),
            crm=crm_type(db, batcher, owned_properties=owned_properties, sender_email=sender_email),
            fallback=FallbackActivities(db, batcher),
            escalation=EscalationActivities(db, webhook),
        )
