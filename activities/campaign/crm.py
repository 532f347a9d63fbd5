"""The outbound CRM action of a campaign step: gated, written once, then on record.

Every write carries the idempotency key ``{workflow_id}:{step_id}``; the audit row comes once
the CRM has answered, unique on (workflow, step, kind), so a retry adds nothing. A 429 is
retried after exactly the CRM's ``Retry-After``; an outage is retried without a cap; a
rejection of this record (4xx) is the campaign's business failure.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.campaign import gate
from activities.campaign.log_context import bind
from cohortflow.crm.client import ContactUpsert, CrmClient
from cohortflow.crm.errors import CrmError, CrmRateLimited, CrmRejected
from cohortflow.storage import customers
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import CrmOutcome, CrmWriteInput, CrmWriteResult
from workflows.campaign.contract import ActivityName, idempotency_key

log = structlog.get_logger(__name__)


class CrmActivities:
    """Writes to the CRM through the consent and frequency-cap gate."""

    def __init__(self, db: Database, crm: CrmClient) -> None:
        self._db = db
        self._crm = crm

    @activity.defn(name=ActivityName.CRM_WRITE)
    async def crm_write(self, inp: CrmWriteInput) -> CrmWriteResult:
        """Check pause, consent and the frequency cap right before writing, then write once
        to the CRM; the action holds a cap reservation from the gate until it is recorded."""
        bind(inp.workflow_id, inp.customer_key)
        stopped = await gate.gate(self._db, inp, gate.reservation_ttl(activity.info()))
        if stopped is not None:
            stopped.decisions_recorded = len(inp.decisions)  # the gate's transaction wrote them
            return stopped
        record_id = await self._send_or_release(inp)
        await gate.written(self._db, inp)
        log.info("crm written", action=inp.action, attempt=activity.info().attempt)
        return CrmWriteResult(
            outcome=CrmOutcome.WRITTEN,
            crm_record_id=record_id,
            decisions_recorded=len(inp.decisions),
        )

    async def _send_or_release(self, inp: CrmWriteInput) -> str:
        """Send, mapping CRM errors to what Temporal should do. On a retryable failure the
        reservation stays for the retry (a 5xx or a timeout may even have reached the CRM);
        on a definitive one it goes at once."""
        try:
            return await self._send(inp, idempotency_key(inp.workflow_id, inp.step_id))
        except CrmRateLimited as exc:
            log.warning("crm rate limited", retry_after=exc.retry_after)
            raise ApplicationError(
                "CRM rate limit",
                type="CrmRateLimited",
                next_retry_delay=timedelta(seconds=exc.retry_after),
            ) from exc
        except CrmRejected as exc:
            await gate.release(self._db, inp.customer_key, inp.workflow_id, inp.step_id)
            raise ApplicationError(
                f"CRM rejected {exc.field or 'request'}: {exc.detail}",
                type="CrmRejected",
                non_retryable=True,
            ) from exc
        except CrmError as exc:
            raise ApplicationError(f"CRM unavailable: {exc}", type="CrmUnavailable") from exc
        except ApplicationError as exc:
            if exc.non_retryable:
                await gate.release(self._db, inp.customer_key, inp.workflow_id, inp.step_id)
            raise

    async def _send(self, inp: CrmWriteInput, key: str) -> str:
        contact_id = inp.customer_key
        if inp.action == "set_properties":
            properties = dict(inp.properties)
            async with self._db.transaction() as session:
                customer = await customers.get_customer(session, inp.customer_key)
            # Contact data is resolved here, inside the activity, never in workflow history.
            if customer is not None and customer.email:
                properties["email"] = customer.email
            results = await self._crm.upsert_contacts([ContactUpsert(contact_id, key, properties)])
            return results[0].contact_id
        if inp.action == "enroll_sequence":
            enrolment = await self._crm.enroll_in_sequence(contact_id, inp.sequence_id, key)
            return f"{enrolment.sequence_id}:{enrolment.contact_id}"
        if inp.action == "add_to_list":
            membership = await self._crm.add_to_list(contact_id, inp.list_id, key)
            return f"{membership.list_id}:{membership.contact_id}"
        raise ApplicationError(
            f"unknown CRM action {inp.action!r}", type="CrmRejected", non_retryable=True
        )
