"""Loading the spec version a campaign runs."""

from __future__ import annotations

from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from cohortflow.spec import SpecError, parse_spec
from cohortflow.storage import campaigns
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import LoadSpecInput
from workflows.campaign.contract import ActivityName
from workflows.campaign.definition import CampaignSpecDef

# Where a campaign goes when its stored spec cannot even say which safe segment it has.
DEFAULT_SAFE_SEGMENT = "safe_default"


class SpecActivities:
    """Reads stored spec versions."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @activity.defn(name=ActivityName.LOAD_SPEC)
    async def load_spec(self, inp: LoadSpecInput) -> CampaignSpecDef:
        """Load one stored spec version, so the history records exactly what ran.

        A version that is missing or no longer passes validation (edited by hand, or stored
        under rules since tightened) is a non-retryable ``SpecInvalid`` failure: retrying
        cannot fix it, so the campaign goes to the safe default segment the document names
        (the failure's first detail), or ``DEFAULT_SAFE_SEGMENT``.
        """
        async with self._db.transaction() as session:
            stored = await campaigns.get_spec_version(session, inp.campaign_id, inp.version)
        where = f"campaign {inp.campaign_id} v{inp.version}"
        if stored is None:
            raise _invalid(f"{where} is not stored", None)
        document, applied_by = stored
        try:
            return parse_spec(document).to_definition(inp.version, applied_by)
        except SpecError as exc:
            raise _invalid(f"{where}: {'; '.join(exc.problems)}", document) from exc


def _invalid(message: str, document: Any) -> ApplicationError:
    segment = document.get("safe_default_segment") if isinstance(document, dict) else None
    if not isinstance(segment, str) or not segment.strip():
        segment = DEFAULT_SAFE_SEGMENT
    return ApplicationError(message[:500], segment, type="SpecInvalid", non_retryable=True)
