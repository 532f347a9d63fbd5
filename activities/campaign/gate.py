"""The last word before an outbound CRM action: pause, consent, then the frequency cap.

One short transaction, never held across the CRM call. Between the gate and the action's
``crm_written`` row the action holds a reservation, so the cross-campaign frequency cap also
counts actions still in flight.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity

from activities.campaign.audit import append_decisions, append_row
from cohortflow.storage import campaigns, consent, crm_ledger, outbound, reservations
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import CrmOutcome, CrmWriteInput, CrmWriteResult
from workflows.campaign.contract import AuditKind

# Used by reservation_ttl when the activity's info lacks a timeout or a retry policy.
DEFAULT_ATTEMPT_TIMEOUT = timedelta(minutes=1)
# Temporal's default maximum retry interval is 100 times the initial interval.
DEFAULT_BACKOFF_FACTOR = 100
# Room for a retry that waits in the task queue (the CRM queue is rate limited).
RESERVATION_SLACK = timedelta(minutes=1)


async def gate(db: Database, inp: CrmWriteInput, ttl: timedelta) -> CrmWriteResult | None:
    """Pause, consent, then the cap: the outcome that stops the action, or None to write.

    Appends the decisions the action carries and its consent row in the same transaction.
    """
    async with db.transaction() as session:
        # First: every transaction that takes a customer's lock takes it before the audit
        # chain's lock (appended to below), so the two never deadlock.
        await reservations.lock_customer(session, inp.customer_key)
        await append_decisions(
            session, inp.workflow_id, inp.campaign_id, inp.customer_key, inp.decisions
        )
        campaign = await campaigns.get_campaign(session, inp.campaign_id)
        if campaign is not None and campaign.status == "paused":
            return CrmWriteResult(outcome=CrmOutcome.PAUSED, detail="campaign paused")
        allowed = await consent.has_consent(session, inp.customer_key, inp.channel, inp.purpose)
        kind = AuditKind.CONSENT_ALLOWED if allowed else AuditKind.CONSENT_BLOCKED
        await _append(session, inp, kind, {"channel": inp.channel, "purpose": inp.purpose})
        if not allowed:
            return CrmWriteResult(
                outcome=CrmOutcome.CONSENT_BLOCKED,
                detail=f"no consent for {inp.channel}/{inp.purpose}",
            )
        return await _cap(session, inp, ttl)


async def _cap(session: AsyncSession, inp: CrmWriteInput, ttl: timedelta) -> CrmWriteResult | None:
    """Refuse the action when the customer already has ``cap_max_actions`` outbound
    actions, from any campaign, within the cap's window; otherwise reserve its slot.

    Runs under the customer's lock (see ``gate``), and counts actions written (audit rows
    ``crm_written``) and in flight (live reservations), so the cap is strict: of campaigns
    acting on one customer at the same instant, only as many as there are slots pass. Every
    action reserves, capped campaign or not, so a capped campaign also sees an uncapped one's
    write in flight. A retry of an action that was written, or whose reservation is still
    live, is never capped: it is the same action.
    """
    written = AuditKind.CRM_WRITTEN
    if await outbound.already_written(session, inp.workflow_id, inp.step_id, written_kind=written):
        return None  # its crm_written row counts it; nothing to reserve
    now = datetime.now(UTC)
    own = await reservations.get_reservation(session, inp.workflow_id, inp.step_id)
    holds_slot = own is not None and own.expires_at > now
    if inp.cap_max_actions > 0 and not holds_slot:
        recent = await outbound.outbound_since(
            session,
            inp.customer_key,
            now - timedelta(seconds=inp.cap_window_seconds),
            written_kind=written,
            exclude=(inp.workflow_id, inp.step_id),
            now=now,
        )
        if recent >= inp.cap_max_actions:
            await _append(
                session,
                inp,
                AuditKind.FREQUENCY_CAPPED,
                {
                    "action": inp.action,
                    "recent_actions": recent,
                    "max_actions": inp.cap_max_actions,
                    "window_seconds": inp.cap_window_seconds,
                },
            )
            return CrmWriteResult(
                outcome=CrmOutcome.CAPPED,
                detail=f"{recent} outbound actions in the cap window (max {inp.cap_max_actions})",
            )
    # Each attempt renews the reservation, so it only has to outlive one attempt.
    await reservations.reserve(
        session,
        workflow_id=inp.workflow_id,
        step_id=inp.step_id,
        campaign_id=inp.campaign_id,
        customer_key=inp.customer_key,
        expires_at=now + ttl,
        now=now,
    )
    return None


async def written(db: Database, inp: CrmWriteInput, effect: crm_ledger.Effect) -> None:
    """The CRM took the action: its ledger entry and ``crm_written`` row replace its
    reservation in one transaction, so no cap check ever counts it twice or misses it."""
    async with db.transaction() as session:
        await reservations.lock_customer(session, inp.customer_key)
        await crm_ledger.record(session, effect)
        payload = {"action": inp.action, "crm_id": effect.crm_id, "confirmed": effect.how}
        await _append(session, inp, AuditKind.CRM_WRITTEN, payload)
        await reservations.release(session, inp.workflow_id, inp.step_id)


async def release(db: Database, customer_key: str, workflow_id: str, step_id: str) -> None:
    """Give back the cap slot of an action that will not be written."""
    async with db.transaction() as session:
        await reservations.lock_customer(session, customer_key)
        await reservations.release(session, workflow_id, step_id)


async def _append(
    session: AsyncSession, inp: CrmWriteInput, kind: AuditKind, payload: dict[str, Any]
) -> None:
    """Append one row about this action."""
    await append_row(
        session, inp.workflow_id, inp.step_id, kind, inp.campaign_id, inp.customer_key, payload
    )


def reservation_ttl(info: activity.Info) -> timedelta:
    """How long a cap reservation outlives the gate of the attempt that made or renewed it.

    Every attempt renews its action's reservation at its gate, so one must last until the
    next attempt's gate: this attempt may run, and its CRM call land, until its
    start-to-close timeout (Temporal does not stop a timed-out attempt; the CRM client's own
    timeout is shorter), the next one is due at most the retry policy's maximum interval
    later, and ``RESERVATION_SLACK`` covers a wait in the task queue. For ``crm_write``
    (10 minutes, as an attempt may wait its turn for a batch under the CRM's ceiling; at most
    2 minutes between attempts) that is 13 minutes.

    A bound rather than "until the workflow says so" because the action may end without
    anyone to say it (workflow terminated or reset, worker lost). Actions that end without a
    write in the usual ways release their slot at once (``CrmRejected``, ``resolve_fallback``),
    so the bound only decides how long a vanished action keeps a slot. A retry that comes
    later (e.g. after a long ``Retry-After``, when nothing was written) is checked afresh.
    """
    attempt = info.start_to_close_timeout or info.schedule_to_close_timeout
    policy = info.retry_policy
    if policy is None:
        backoff = timedelta(seconds=1) * DEFAULT_BACKOFF_FACTOR
    else:
        backoff = policy.maximum_interval or policy.initial_interval * DEFAULT_BACKOFF_FACTOR
    return (attempt or DEFAULT_ATTEMPT_TIMEOUT) + backoff + RESERVATION_SLACK
