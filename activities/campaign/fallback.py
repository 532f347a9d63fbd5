"""The safe default segment: where a customer goes when the campaign cannot go on safely."""

from __future__ import annotations

import structlog
from temporalio import activity

from activities.campaign.audit import append_decisions, append_row
from activities.campaign.batcher import CrmBatcher
from activities.campaign.heartbeat import heartbeating
from activities.campaign.log_context import bind
from cohortflow.crm.connector import ContactWrite, CrmError
from cohortflow.storage import reservations, segments
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import FallbackInput, FallbackResult
from workflows.campaign.contract import ActivityName, AuditKind, idempotency_key

log = structlog.get_logger(__name__)

SEGMENT_PROPERTY = "cohortflow_segment"


class FallbackActivities:
    """Assigns safe default segments, in the store always and in the CRM when it answers."""

    def __init__(self, db: Database, batcher: CrmBatcher) -> None:
        self._db = db
        self._batcher = batcher

    @activity.defn(name=ActivityName.RESOLVE_FALLBACK)
    async def resolve_fallback(self, inp: FallbackInput) -> FallbackResult:
        """Put the customer in the safe default segment: in our store always, in the CRM if
        it can.

        The segment label is not an outbound message, so it is not consent-gated: it is what
        keeps the customer out of the campaign's riskier paths.
        """
        bind(inp.workflow_id, inp.customer_key)
        key = idempotency_key(inp.workflow_id, f"{inp.step_id}:fallback")
        write = ContactWrite(key, inp.customer_key, {SEGMENT_PROPERTY: inp.segment})
        try:
            async with heartbeating():
                outcome = await self._batcher.upsert(write)
            synced, detail = outcome.ok, outcome.error
        except CrmError as exc:
            synced, detail = False, f"{type(exc).__name__}: {exc}"
        async with self._db.transaction() as session:
            # The step's CRM write, if it was one, ended without being recorded: its cap slot
            # goes back now rather than at the reservation's expiry. The customer's lock comes
            # first, as in every transaction that touches reservations and the audit chain.
            await reservations.lock_customer(session, inp.customer_key)
            await reservations.release(session, inp.workflow_id, inp.step_id)
            await append_decisions(
                session, inp.workflow_id, inp.campaign_id, inp.customer_key, inp.decisions
            )
            await segments.assign_segment(
                session,
                workflow_id=inp.workflow_id,
                step_id=inp.step_id,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                segment=inp.segment,
                reason=inp.reason,
                crm_synced=synced,
            )
            await append_row(
                session,
                inp.workflow_id,
                inp.step_id,
                AuditKind.FALLBACK,
                inp.campaign_id,
                inp.customer_key,
                {"segment": inp.segment, "reason": inp.reason, "crm_synced": synced},
            )
        log.warning("fallback", segment=inp.segment, reason=inp.reason, crm_synced=synced)
        return FallbackResult(
            segment=inp.segment,
            crm_synced=synced,
            detail=detail,
            decisions_recorded=len(inp.decisions),
        )
