"""The campaign activities: every side effect a CampaignWorkflow has.

Each is idempotent. Writes to our database carry their audit row in the same transaction;
CRM writes carry the idempotency key ``{workflow_id}:{step_id}`` and append their audit row
once the CRM has answered, under the unique (workflow, step, kind), so a retry adds nothing.
Between the gate and that audit row a CRM write holds a reservation, so the cross-campaign
frequency cap also counts the writes still in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from cohortflow import outbound, schedule
from cohortflow.crm.client import ContactUpsert, CrmClient
from cohortflow.crm.errors import CrmError, CrmRateLimited, CrmRejected
from cohortflow.spec import parse_spec
from cohortflow.storage import (
    approvals,
    audit,
    campaigns,
    consent,
    customers,
    reservations,
    segments,
)
from cohortflow.storage.db import Database
from scoring.scorer import Scorer, ScoringError
from workflows.messages import (
    AuditInput,
    AuditResult,
    CampaignSpecDef,
    Contribution,
    CrmOutcome,
    CrmWriteInput,
    CrmWriteResult,
    CustomerScore,
    Decision,
    FallbackInput,
    FallbackResult,
    LoadSpecInput,
    LocalTimeInput,
    LocalTimeResult,
    ScoreInput,
    ScoreResult,
    idempotency_key,
)

log = structlog.get_logger(__name__)

SEGMENT_PROPERTY = "cohortflow_segment"

# Used by reservation_ttl when the activity's info lacks a timeout or a retry policy.
DEFAULT_ATTEMPT_TIMEOUT = timedelta(minutes=1)
# Temporal's default maximum retry interval is 100 times the initial interval.
DEFAULT_BACKOFF_FACTOR = 100
# Room for a retry that waits in the task queue (the CRM queue is rate limited).
RESERVATION_SLACK = timedelta(minutes=1)


class CampaignActivities:
    """Activities bound to their dependencies (database, scorer, CRM client)."""

    def __init__(self, db: Database, scorer: Scorer, crm: CrmClient) -> None:
        self._db = db
        self._scorer = scorer
        self._crm = crm

    @activity.defn(name="load_spec")
    async def load_spec(self, inp: LoadSpecInput) -> CampaignSpecDef:
        """Load one stored spec version, so the history records exactly what ran."""
        async with self._db.transaction() as session:
            document = await campaigns.get_spec(session, inp.campaign_id, inp.version)
        if document is None:
            raise ApplicationError(
                f"campaign {inp.campaign_id} has no version {inp.version}", non_retryable=True
            )
        return parse_spec(document).to_definition(inp.version)

    @activity.defn(name="score_customer")
    async def score_customer(self, inp: ScoreInput) -> ScoreResult:
        """Score customers with the champion of each model and audit scores and reasons."""
        _bind(inp.workflow_id, inp.customer_keys[0] if inp.customer_keys else "")
        async with self._db.transaction() as session:
            features = await customers.get_features(session, inp.customer_keys)
        missing = [k for k in inp.customer_keys if k not in features]
        if missing:
            raise ApplicationError(
                f"no features stored for {len(missing)} customer(s)",
                type="ScoringError",
                non_retryable=True,
            )
        rows = [features[k] for k in inp.customer_keys]
        try:
            batches = await asyncio.to_thread(
                lambda: [self._scorer.score(model, rows) for model in inp.models]
            )
        except ScoringError as exc:
            raise ApplicationError(
                f"{type(exc).__name__}: {exc}", type="ScoringError", non_retryable=True
            ) from exc

        def shadow_scores() -> dict[str, dict[str, Any]]:
            # Challengers score in shadow: audited for comparison, never returned to the
            # workflow, and a broken challenger never fails the step.
            found: dict[str, dict[str, Any]] = {}
            for model in inp.models:
                version: str | None = None
                try:
                    version = self._scorer.challenger_version(model)
                    if version is not None:
                        batch = self._scorer.score(model, rows, version=version, top_k=0)
                        found[model] = {"version": batch.version, "scores": batch.scores}
                except ScoringError as exc:
                    found[model] = {"version": version, "error": f"{type(exc).__name__}: {exc}"}
            return found

        shadow = await asyncio.to_thread(shadow_scores)
        result = ScoreResult(
            model_versions={b.model: b.version for b in batches},
            customers=[
                CustomerScore(
                    customer_key=key,
                    scores={b.model: float(b.scores[i]) for b in batches},
                    features={n: float(v) for n, v in rows[i].items() if v is not None},
                    top_contributions={
                        b.model: [Contribution(f, float(v)) for f, v in b.contributions[i]]
                        for b in batches
                    },
                )
                for i, key in enumerate(inp.customer_keys)
            ],
        )
        async with self._db.transaction() as session:
            await _decisions(session, inp, inp.decisions)
            for i, customer in enumerate(result.customers):
                await audit.append_audit(
                    session,
                    audit.AuditEvent(
                        workflow_id=inp.workflow_id,
                        step_id=inp.step_id,
                        kind="scored",
                        campaign_id=inp.campaign_id,
                        customer_key=customer.customer_key,
                        payload={
                            "scores": customer.scores,
                            "model_versions": result.model_versions,
                            "top_contributions": {
                                m: [asdict(c) for c in cs]
                                for m, cs in customer.top_contributions.items()
                            },
                            "shadow": {
                                m: {"version": sh["version"], "score": sh["scores"][i]}
                                if "scores" in sh
                                else sh
                                for m, sh in shadow.items()
                            },
                        },
                    ),
                )
        log.info("scored", models=result.model_versions)
        result.decisions_recorded = len(inp.decisions)
        return result

    @activity.defn(name="crm_write")
    async def crm_write(self, inp: CrmWriteInput) -> CrmWriteResult:
        """Check pause, consent and the frequency cap right before writing, then write once
        to the CRM; the action holds a cap reservation from the gate until it is recorded."""
        _bind(inp.workflow_id, inp.customer_key)
        gate = await self._gate(inp)
        if gate is not None:
            gate.decisions_recorded = len(inp.decisions)  # the gate's transaction wrote them
            return gate
        key = idempotency_key(inp.workflow_id, inp.step_id)
        # On a retryable failure the reservation stays for the retry Temporal makes (a 5xx or
        # a timeout may even have reached the CRM); on a definitive one it goes at once.
        try:
            record_id = await self._send(inp, key)
        except CrmRateLimited as exc:
            log.warning("crm rate limited", retry_after=exc.retry_after)
            raise ApplicationError(
                "CRM rate limit",
                type="CrmRateLimited",
                next_retry_delay=timedelta(seconds=exc.retry_after),
            ) from exc
        except CrmRejected as exc:
            await self._release(inp)
            raise ApplicationError(
                f"CRM rejected {exc.field or 'request'}: {exc.detail}",
                type="CrmRejected",
                non_retryable=True,
            ) from exc
        except CrmError as exc:
            raise ApplicationError(f"CRM unavailable: {exc}", type="CrmUnavailable") from exc
        except ApplicationError as exc:
            if exc.non_retryable:
                await self._release(inp)
            raise
        async with self._db.transaction() as session:
            await reservations.lock_customer(session, inp.customer_key)
            await audit.append_audit(
                session,
                _event(inp.workflow_id, inp.step_id, "crm_written", inp, {"action": inp.action}),
            )
            # In the same transaction: the action turns from in flight into written at once,
            # so no cap check ever counts it twice or misses it.
            await reservations.release(session, inp.workflow_id, inp.step_id)
        log.info("crm written", action=inp.action, attempt=activity.info().attempt)
        return CrmWriteResult(
            outcome=CrmOutcome.WRITTEN,
            crm_record_id=record_id,
            decisions_recorded=len(inp.decisions),
        )

    async def _release(self, inp: CrmWriteInput) -> None:
        """Give back the cap slot of an action that will not be written."""
        async with self._db.transaction() as session:
            await reservations.lock_customer(session, inp.customer_key)
            await reservations.release(session, inp.workflow_id, inp.step_id)

    async def _gate(self, inp: CrmWriteInput) -> CrmWriteResult | None:
        """Pause, consent, then the frequency cap: the last word before the CRM is called.

        One short transaction, never held across the CRM call.
        """
        async with self._db.transaction() as session:
            # First: every transaction that takes a customer's lock takes it before the
            # audit chain's lock (appended to below), so the two never deadlock.
            await reservations.lock_customer(session, inp.customer_key)
            await _decisions(session, inp, inp.decisions)
            campaign = await campaigns.get_campaign(session, inp.campaign_id)
            if campaign is not None and campaign.status == "paused":
                return CrmWriteResult(outcome=CrmOutcome.PAUSED, detail="campaign paused")
            allowed = await consent.has_consent(session, inp.customer_key, inp.channel, inp.purpose)
            kind = "consent_allowed" if allowed else "consent_blocked"
            await audit.append_audit(
                session,
                _event(
                    inp.workflow_id,
                    inp.step_id,
                    kind,
                    inp,
                    {"channel": inp.channel, "purpose": inp.purpose},
                ),
            )
            if not allowed:
                return CrmWriteResult(
                    outcome=CrmOutcome.CONSENT_BLOCKED,
                    detail=f"no consent for {inp.channel}/{inp.purpose}",
                )
            return await self._cap(session, inp)

    async def _cap(self, session: AsyncSession, inp: CrmWriteInput) -> CrmWriteResult | None:
        """Refuse the action when the customer already has ``cap_max_actions`` outbound
        actions, from any campaign, within the cap's window; otherwise reserve its slot.

        Runs under the customer's lock (see ``_gate``), and counts actions written (audit
        rows ``crm_written``) and in flight (live reservations), so the cap is strict: of
        campaigns acting on one customer at the same instant, only as many as there are
        slots pass. Every action reserves, capped campaign or not, so a capped campaign also
        sees an uncapped one's write in flight. A retry of an action that was written, or
        whose reservation is still live, is never capped: it is the same action.
        """
        if await outbound.already_written(session, inp.workflow_id, inp.step_id):
            return None  # its crm_written row counts it; nothing to reserve
        now = datetime.now(UTC)
        own = await reservations.get_reservation(session, inp.workflow_id, inp.step_id)
        holds_slot = own is not None and own.expires_at > now
        if inp.cap_max_actions > 0 and not holds_slot:
            since = now - timedelta(seconds=inp.cap_window_seconds)
            recent = await outbound.outbound_since(
                session, inp.customer_key, since, exclude=(inp.workflow_id, inp.step_id), now=now
            )
            if recent >= inp.cap_max_actions:
                return await self._capped(session, inp, recent)
        # Each attempt renews the reservation, so it only has to outlive one attempt.
        await reservations.reserve(
            session,
            workflow_id=inp.workflow_id,
            step_id=inp.step_id,
            campaign_id=inp.campaign_id,
            customer_key=inp.customer_key,
            expires_at=now + reservation_ttl(activity.info()),
            now=now,
        )
        return None

    async def _capped(
        self, session: AsyncSession, inp: CrmWriteInput, recent: int
    ) -> CrmWriteResult:
        """Record that the cap refused this action, with the count it was refused at."""
        await audit.append_audit(
            session,
            _event(
                inp.workflow_id,
                inp.step_id,
                "frequency_capped",
                inp,
                {
                    "action": inp.action,
                    "recent_actions": recent,
                    "max_actions": inp.cap_max_actions,
                    "window_seconds": inp.cap_window_seconds,
                },
            ),
        )
        return CrmWriteResult(
            outcome=CrmOutcome.CAPPED,
            detail=f"{recent} outbound actions in the cap window (max {inp.cap_max_actions})",
        )

    @activity.defn(name="plan_local_time")
    async def plan_local_time(self, inp: LocalTimeInput) -> LocalTimeResult:
        """The UTC instant a local-time rule (wait until HH:MM, quiet hours) lets a campaign on,
        in the customer's zone (``outbound.customer_zone``: the spec's default when unknown).

        Read-only and recorded in history as a local activity's result, so a replay never
        depends on this machine's time zone data.
        """
        async with self._db.transaction() as session:
            tz = await outbound.customer_zone(session, inp.customer_key, inp.default_timezone)
        now = datetime.fromisoformat(inp.now)
        if inp.until:
            at = schedule.next_local_time(now, tz, inp.until)
        elif inp.quiet_start:
            at = schedule.quiet_hours_end(now, tz, inp.quiet_start, inp.quiet_end)
        else:
            at = now
        return LocalTimeResult(at=at.isoformat(), timezone=tz.key)

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
        raise ApplicationError(f"unknown CRM action {inp.action!r}", non_retryable=True)

    @activity.defn(name="record_audit")
    async def record_audit(self, inp: AuditInput) -> AuditResult:
        """Append a decision the workflow made; approval rows change in the same transaction."""
        async with self._db.transaction() as session:
            await _decisions(session, inp, inp.decisions)
            appended = await audit.append_audit(
                session, _event(inp.workflow_id, inp.step_id, inp.kind, inp, inp.payload)
            )
            await self._approval_row(session, inp)
        return AuditResult(seq=appended.seq, created=appended.created)

    async def _approval_row(self, session: Any, inp: AuditInput) -> None:
        pending = inp.approval
        if pending is None:
            return
        if inp.kind == "approval_requested":
            scores = inp.payload.get("scores", {})
            await approvals.add_pending(
                session,
                approval_id=pending.approval_id,
                workflow_id=inp.workflow_id,
                step_id=inp.step_id,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                reason=pending.reason,
                scores=scores if isinstance(scores, dict) else {},
                requested_at=datetime.fromisoformat(pending.requested_at),
                expires_at=datetime.fromisoformat(pending.expires_at),
            )
            return
        decided = {
            "approval_decided": "approved" if inp.payload.get("approve") else "rejected",
            "approval_expired": "expired",
            "approval_withdrawn": "expired",
        }.get(inp.kind)
        if decided is not None:
            operator = inp.payload.get("operator")
            reason = inp.payload.get("reason") or inp.payload.get("why")
            try:
                await approvals.mark_decided(
                    session,
                    pending.approval_id,
                    status=decided,  # type: ignore[arg-type]
                    operator=str(operator) if operator else None,
                    reason=str(reason) if reason else None,
                    decided_at=activity.info().current_attempt_scheduled_time,
                )
            except (approvals.ApprovalAlreadyDecided, approvals.ApprovalNotFound) as exc:
                raise ApplicationError(str(exc), non_retryable=True) from exc

    @activity.defn(name="resolve_fallback")
    async def resolve_fallback(self, inp: FallbackInput) -> FallbackResult:
        """Put the customer in the safe default segment: in our store always, in the CRM if it can.

        The segment label is not an outbound message, so it is not consent-gated: it is what
        keeps the customer out of the campaign's riskier paths.
        """
        _bind(inp.workflow_id, inp.customer_key)
        synced, detail = True, ""
        try:
            await self._crm.upsert_contacts(
                [
                    ContactUpsert(
                        inp.customer_key,
                        idempotency_key(inp.workflow_id, f"{inp.step_id}:fallback"),
                        {SEGMENT_PROPERTY: inp.segment},
                    )
                ]
            )
        except CrmError as exc:
            synced, detail = False, f"{type(exc).__name__}: {exc}"
        async with self._db.transaction() as session:
            # The step's CRM write, if it was one, ended without being recorded: its cap slot
            # goes back now rather than at the reservation's expiry. The customer's lock comes
            # first, as in every transaction that touches reservations and the audit chain.
            await reservations.lock_customer(session, inp.customer_key)
            await reservations.release(session, inp.workflow_id, inp.step_id)
            await _decisions(session, inp, inp.decisions)
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
            await audit.append_audit(
                session,
                _event(
                    inp.workflow_id,
                    inp.step_id,
                    "fallback",
                    inp,
                    {"segment": inp.segment, "reason": inp.reason, "crm_synced": synced},
                ),
            )
        log.warning("fallback", segment=inp.segment, reason=inp.reason, crm_synced=synced)
        return FallbackResult(
            segment=inp.segment,
            crm_synced=synced,
            detail=detail,
            decisions_recorded=len(inp.decisions),
        )


def reservation_ttl(info: activity.Info) -> timedelta:
    """How long a cap reservation outlives the gate of the attempt that made or renewed it.

    Every attempt renews its action's reservation at its gate, so one must last until the
    next attempt's gate: this attempt may run, and its CRM call land, until its
    start-to-close timeout (Temporal does not stop a timed-out attempt; the CRM client's own
    timeout is shorter), the next one is due at most the retry policy's maximum interval
    later, and ``RESERVATION_SLACK`` covers a wait in the task queue. For ``crm_write``
    (60 s, at most 2 min between attempts) that is 4 minutes.

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


async def _decisions(
    session: AsyncSession,
    source: ScoreInput | CrmWriteInput | AuditInput | FallbackInput,
    decisions: list[Decision],
) -> None:
    """Append the workflow's decisions this activity carries, in the order they were made.

    A retry appends nothing twice: rows are unique on (workflow, step, kind).
    """
    for decision in decisions:
        await audit.append_audit(
            session,
            _event(source.workflow_id, decision.step_id, decision.kind, source, decision.payload),
        )


def _event(
    workflow_id: str,
    step_id: str,
    kind: str,
    source: ScoreInput | CrmWriteInput | AuditInput | FallbackInput,
    payload: dict[str, Any],
) -> audit.AuditEvent:
    # A campaign scores its one customer; a batch from elsewhere carries no decisions.
    if isinstance(source, ScoreInput):
        customer_key = source.customer_keys[0] if source.customer_keys else ""
    else:
        customer_key = source.customer_key
    return audit.AuditEvent(
        workflow_id=workflow_id,
        step_id=step_id,
        kind=kind,
        campaign_id=source.campaign_id,
        customer_key=customer_key,
        payload=payload,
    )


def _bind(workflow_id: str, customer_key: str) -> None:
    """Every log line of this activity carries the workflow id and the (pseudonymous) key."""
    structlog.contextvars.bind_contextvars(workflow_id=workflow_id, customer_key=customer_key)
