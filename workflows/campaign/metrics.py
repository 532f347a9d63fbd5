"""The campaign's own counters, emitted through the SDK's meter (so they appear beside the
SDK's metrics wherever the worker's runtime exports them; nothing is counted while a
history replays)."""

from __future__ import annotations

from temporalio import workflow


def started(campaign_id: str) -> None:
    """A campaign entry began (not a continuation)."""
    workflow.metric_meter().create_counter(
        "cohortflow_campaigns_started", "Campaign entries started"
    ).add(1, {"campaign_id": campaign_id})


def finished(campaign_id: str, state: str, fallback_reason: str) -> None:
    """A campaign reached its terminal ``state`` (with the fallback's reason, if any)."""
    workflow.metric_meter().create_counter(
        "cohortflow_campaigns_finished", "Campaigns ended, by terminal state"
    ).add(1, {"campaign_id": campaign_id, "state": state, "fallback_reason": fallback_reason})
