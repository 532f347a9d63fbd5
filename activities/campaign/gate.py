"""The last word before an outbound CRM action (pause, consent, then the frequency cap) and
the record once the CRM took it, for many actions at once.

Both run in one short transaction per group of concurrent actions (``storage.group_commit``),
never held across the CRM call. Between the gate and the action's ``crm_written`` row the
action holds a reservation, so the cross-campaign frequency cap also counts actions still in
flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity

from cohortflow.storage import (
    audit,
    campaigns,
    consent,
    crm_ledger,
    customers,
    outbound,
    reservations,
)
from cohortflow.storage.db import Database
from cohortflow.storage.tables import CrmEffect
from workflows.campaign.activity_io import CrmOutcome, CrmWriteInput, CrmWriteResult, Decision
from workflows.campaign.contract import AuditKind, idempotency_key

# Used by reservation_ttl when the activity's info lacks a timeout or a retry policy.
DEFAULT_ATTEMPT_TIMEOUT = timedelta(minutes=1)
# Temporal's default maximum retry interval is 100 times the initial interval.
DEFAULT_BACKOFF_FACTOR = 100
# Room for a retry that waits in the task queue (the CRM queue is rate limited).
RESERVATION_SLACK = timedelta(minutes=1)


@dataclass(frozen=True)
class GateItem:
    """One action at the gate, with how long its cap slot must outlive this attempt."""

    inp: CrmWriteInput
    ttl: timedelta


@dataclass(frozen=True)
class Verdict:
    """What the gate says of one action: ``stopped`` (paused, no consent, capped), or go on,
    with the effect the ledger already holds for its key and the contact's e-mail."""

    stopped: CrmWriteResult | None
    confirmed: CrmEffect | None = None
    email: str = ""


async def gate_many(session: AsyncSession, items: Sequence[GateItem]) -> list[Verdict]:
    """Pause, consent, then the frequency cap, for many actions in one transaction.

    Appends the decisions each action carries and its consent row. Customers' locks come
    first (every transaction takes them before the audit chain's, so the two never
    deadlock), and the chain is appended to last, so its global lock is held briefly.
    """
    now = datetime.now(UTC)
    inputs = [item.inp for item in items]
    actions = [(i.workflow_id, i.step_id) for i in inputs]
    await reservations.lock_customers(session, {i.customer_key for i in inputs})
    paused = await campaigns.statuses(session, {i.campaign_id for i in inputs})
    granted = await consent.granted_many(
        session, {(i.customer_key, i.channel, i.purpose) for i in inputs}
    )
    ledger = await crm_ledger.confirmed_many(session, [idempotency_key(w, s) for w, s in actions])
    written = await outbound.written_many(session, actions, written_kind=AuditKind.CRM_WRITTEN)
    own = await reservations.expiries(session, actions)
    emails = await customers.emails(
        session, {i.customer_key for i in inputs if i.action == "set_properties"}
    )
    events: list[audit.AuditEvent] = []
    verdicts: list[Verdict | None] = []
    hold: list[reservations.Held] = []
    capped: list[int] = []
    for index, item in enumerate(items):
        inp = item.inp
        events += _decision_events(inp, inp.decisions)
        go = Verdict(None, ledger.get(idempotency_key(inp.workflow_id, inp.step_id)))
        go = replace(go, email=emails.get(inp.customer_key, ""))
        action = (inp.workflow_id, inp.step_id)
        if action in written:
            # A retry of an action on record: it was made, whatever changed since, and its
            # crm_written row counts it.
            verdicts.append(go)
            continue
        if paused.get(inp.campaign_id) == "paused":
            verdicts.append(Verdict(CrmWriteResult(CrmOutcome.PAUSED, detail="campaign paused")))
            continue
        allowed = (inp.customer_key, inp.channel, inp.purpose) in granted
        kind = AuditKind.CONSENT_ALLOWED if allowed else AuditKind.CONSENT_BLOCKED
        events.append(_event(inp, kind, {"channel": inp.channel, "purpose": inp.purpose}))
        if not allowed:
            detail = f"no consent for {inp.channel}/{inp.purpose}"
            verdicts.append(Verdict(CrmWriteResult(CrmOutcome.CONSENT_BLOCKED, detail=detail)))
            continue
        verdicts.append(go)
        slot = own.get(action)
        if inp.cap_max_actions > 0 and not (slot is not None and slot > now):
            capped.append(index)
            continue
        hold.append(_held(inp, now + item.ttl))
    # Each attempt renews its reservation, so one only has to outlive one attempt.
    await reservations.reserve_many(session, hold, now=now)
    for index in capped:  # in order: each counts the slots taken before it
        verdicts[index] = await _cap(session, items[index], now, events) or verdicts[index]
    await audit.append_many(session, events)
    return [v for v in verdicts if v is not None]


async def _cap(
    session: AsyncSession, item: GateItem, now: datetime, events: list[audit.AuditEvent]
) -> Verdict | None:
    """Refuse the action when the customer already has ``cap_max_actions`` outbound
    actions, from any campaign, within the cap's window; otherwise reserve its slot.

    Runs under the customer's lock and counts actions written (``crm_written`` rows) and in
    flight (live reservations, those this transaction took included), so the cap is strict:
    of campaigns acting on one customer at the same instant, only as many as there are slots
    pass. Every action reserves, capped campaign or not, so a capped campaign also sees an
    uncapped one's write in flight.
    """
    inp = item.inp
    recent = await outbound.outbound_since(
        session,
        inp.customer_key,
        now - timedelta(seconds=inp.cap_window_seconds),
        written_kind=AuditKind.CRM_WRITTEN,
        exclude=(inp.workflow_id, inp.step_id),
        now=now,
    )
    if recent < inp.cap_max_actions:
        await reservations.reserve_many(session, [_held(inp, now + item.ttl)], now=now)
        return None
    payload = {
        "action": inp.action,
        "recent_actions": recent,
        "max_actions": inp.cap_max_actions,
        "window_seconds": inp.cap_window_seconds,
    }
    events.append(_event(inp, AuditKind.FREQUENCY_CAPPED, payload))
    detail = f"{recent} outbound actions in the cap window (max {inp.cap_max_actions})"
    return Verdict(CrmWriteResult(CrmOutcome.CAPPED, detail=detail))


async def written_many(
    session: AsyncSession, items: Sequence[tuple[CrmWriteInput, crm_ledger.Effect]]
) -> list[None]:
    """The CRM took these actions: their ledger entries and ``crm_written`` rows replace
    their reservations in one transaction, so no cap check ever counts one twice or misses
    it."""
    await reservations.lock_customers(session, {inp.customer_key for inp, _ in items})
    await crm_ledger.record_many(session, [effect for _, effect in items])
    await reservations.release_many(session, [(i.workflow_id, i.step_id) for i, _ in items])
    rows: list[audit.AuditEvent] = []
    for inp, effect in items:
        payload = {"action": inp.action, "crm_id": effect.crm_id, "confirmed": effect.how}
        rows.append(_event(inp, AuditKind.CRM_WRITTEN, payload))
        rows.extend(_decision_events(inp, inp.if_written))
    await audit.append_many(session, rows)
    return [None] * len(items)


async def release(db: Database, customer_key: str, workflow_id: str, step_id: str) -> None:
    """Give back the cap slot of an action that will not be written."""
    async with db.transaction() as session:
        await reservations.lock_customer(session, customer_key)
        await reservations.release(session, workflow_id, step_id)


def _held(inp: CrmWriteInput, expires_at: datetime) -> reservations.Held:
    return reservations.Held(
        inp.workflow_id, inp.step_id, inp.campaign_id, inp.customer_key, expires_at
    )


def _decision_events(inp: CrmWriteInput, decisions: list[Decision]) -> list[audit.AuditEvent]:
    return [
        audit.AuditEvent(
            inp.workflow_id, d.step_id, d.kind, inp.campaign_id, inp.customer_key, d.payload
        )
        for d in decisions
    ]


def _event(inp: CrmWriteInput, kind: AuditKind, payload: dict[str, Any]) -> audit.AuditEvent:
    return audit.AuditEvent(
        inp.workflow_id, inp.step_id, kind, inp.campaign_id, inp.customer_key, payload
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
