"""The campaign's activities, by concern: the spec, scoring, the CRM gate and write, audit,
the safe default segment, local time. Each is idempotent, takes one dataclass and returns
one, and knows nothing of who hosts it (``workers/`` puts them on task queues).
"""

from __future__ import annotations

from dataclasses import dataclass

from activities.campaign.audit import AuditActivities
from activities.campaign.crm import CrmActivities
from activities.campaign.fallback import FallbackActivities
from activities.campaign.local_time import LocalTimeActivities
from activities.campaign.scoring import ScoringActivities
from activities.campaign.spec import SpecActivities
from cohortflow.crm.client import CrmClient
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

    @classmethod
    def build(
        cls,
        db: Database,
        scorer: Scorer,
        crm: CrmClient,
        *,
        crm_type: type[CrmActivities] = CrmActivities,
    ) -> CampaignActivities:
        """Bind every activity to the database, the scorer and the CRM client."""
        return cls(
            spec=SpecActivities(db),
            scoring=ScoringActivities(db, scorer),
            audit=AuditActivities(db),
            local_time=LocalTimeActivities(db),
            crm=crm_type(db, crm),
            fallback=FallbackActivities(db, crm),
        )
