"""What operators do: decide approvals, change consent, pause, resume or cancel campaigns.

The CLI and the HTTP API both call these; they talk to Temporal through the client and to
the database through storage. Every request is validated before anything is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import structlog
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.service import RPCError, RPCStatusCode

from cohortflow.auth import policy
from cohortflow.auth.identity import Identity
from cohortflow.campaigns import visibility
from cohortflow.campaigns.approval_context import ApprovalContext, approval_context
from cohortflow.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from cohortflow.events.relay import Held, SignalRelay
from cohortflow.events.signals import TemporalSignaller, TemporalStatus
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import approvals, audit, campaigns, consent, customers
from cohortflow.storage.db import Database
from cohortflow.storage.group_commit import GroupCommit
from cohortflow.storage.signal_outbox import OwedSignal
from cohortflow.storage.tables import Approval
from workflows.campaign.contract import SA, AuditKind, DecideRefusal, HandlerName
from workflows.campaign.messages import ConsentChanged, DecideRequest, DecideResult, PauseChanged
from workflows.campaign.workflow import CampaignWorkflow

# Temporal's answers that settle a decision (the campaign is gone or closed); any other
# failure of the call, a lost connection (UNKNOWN "transport error") included, says nothing
# about the decision, so the operator is told to send it again.
_SETTLED = frozenset({RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION})
POLLER_CHECK_SECONDS = 5.0
# How long a confirmed decision waits for others to share its record's transaction.
_NOTE_LINGER = timedelta(milliseconds=5)

log = structlog.get_logger(__name__)

CampaignAction = Literal["pause", "resume", "cancel"]
# The campaign status each action sets, and the audit row that records it.
_ACTIONS: dict[str, tuple[str, AuditKind]] = {
    "pause": ("paused", AuditKind.CAMPAIGN_PAUSED),
    "resume": ("active", AuditKind.CAMPAIGN_ACTIVE),
    "cancel": ("cancelled", AuditKind.CAMPAIGN_CANCELLED),
}
_NAME_LIMIT = 128


@dataclass(frozen=True)
class ConsentOutcome:
    """What a consent change did: ``signalled`` running campaigns were told at once, and
    ``temporal`` says whether they could be (what was not, the relay delivers later)."""

    customer_key: str
    changed: bool
    signalled: int
    temporal: TemporalStatus = "skipped"


@dataclass(frozen=True)
class CampaignOutcome:
    """What a pause, resume or cancel did."""

    campaign_id: str
    status: str
    workflows: int


class Controls:
    """Operator actions over one database and (when reachable) one Temporal client."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        pseudonymiser: Pseudonymiser,
        client: Client | None,
        relay: SignalRelay | None = None,
    ) -> None:
        """``relay`` delivers the signals consent changes owe (the API's own); by default
        one over ``client``, whose leftovers a running relay (the API's) delivers later."""
        self._db = db
        self._settings = settings
        self._pseudonymiser = pseudonymiser
        self._client = client
        self._relay = relay or SignalRelay(db, TemporalSignaller(self._connected))
        self._poller_seen = -math.inf  # monotonic time a worker was last seen polling
        # Decisions confirmed together (a bulk decision has 16 in flight) are put on their
        # approvals' records in one transaction.
        self._notes = GroupCommit(db, approvals.note_decisions, linger=_NOTE_LINGER)

    # ------------------------------------------------------------------ approvals

    async def list_approvals(
        self, identity: Identity, status: str | None = "pending", campaign_id: str | None = None
    ) -> list[Approval]:
        """Approvals, newest first; ``status`` None lists all, ``campaign_id`` filters."""
        policy.require(identity, policy.READ, "read approvals")
        if status not in (None, "pending", "approved", "rejected", "expired"):
            raise Invalid(f"status: unknown status {status!r}", field="status")
        async with self._db.transaction() as session:
            if campaign_id is not None and not await campaigns.get_campaign(session, campaign_id):
                raise NotFound(f"campaign_id: no campaign {campaign_id!r}", field="campaign_id")
            rows = await approvals.list_approvals(session, status=status, campaign_id=campaign_id)
        return sorted(rows, key=lambda a: a.requested_at, reverse=True)

    async def approval_context(self, identity: Identity, approval_id: str) -> ApprovalContext:
        """One approval with what it takes to decide it."""
        policy.require(identity, policy.READ, "read approvals")
        return await approval_context(self._db, approval_id)

    async def entry_cohorts(self, campaign_ids: set[str]) -> dict[str, str]:
        """The entry cohort of each campaign's latest version."""
        async with self._db.transaction() as session:
            specs = await campaigns.latest_specs(session, campaign_ids)
        return {c: str(spec.get("entry_cohort", "")) for c, spec in specs.items()}

    async def decide(
        self, approval_id: str, *, approve: bool, identity: Identity, reason: str
    ) -> DecideResult:
        """Approve or reject a pending approval through the campaign's ``decide`` update,
        as ``identity``; the workflow's validator applies the four-eyes rules."""
        policy.require(identity, policy.DECIDE, "decide approvals")
        _require_text("reason", reason, limit=1000)
        # Read only: on SQLite it does not queue for the write lock (a bulk decision asks
        # thousands of times while the campaigns it wakes write their audit rows).
        async with self._db.read_transaction() as session:
            row = await approvals.get_approval(session, approval_id)
            if row is None:
                raise NotFound(f"approval_id: no approval {approval_id!r}", field="approval_id")
            tags = await campaigns.campaign_tags(session, row.campaign_id)
        if not identity.may_reach(row.campaign_id, tags):
            raise Forbidden(f"{identity.name}'s token does not reach campaign {row.campaign_id}")
        earlier = _earlier(row, approve, identity)
        if earlier is not None:
            # The same decision by the same identity, sent again (a retry after a timeout):
            # the earlier result, not a conflict for a decision that took effect.
            return earlier
        if row.status != "pending":
            raise Conflict(f"approval {approval_id} is already {row.status}", field="approval_id")
        if _aware(row.expires_at) <= datetime.now(UTC):
            raise Conflict(
                f"approval {approval_id} expired at {row.expires_at:%Y-%m-%d %H:%M}Z",
                field="approval_id",
            )
        client = await self._require_worker()
        handle = client.get_workflow_handle_for(CampaignWorkflow.run, row.workflow_id)
        request = DecideRequest(
            approval_id, approve, identity.name, reason.strip(), sorted(identity.roles)
        )
        wait = self._settings.decide_timeout_seconds
        try:
            result = await handle.execute_update(
                CampaignWorkflow.decide, request, rpc_timeout=timedelta(seconds=wait)
            )
        except WorkflowUpdateRPCTimeoutOrCancelledError as exc:
            raise Unavailable(
                f"approval {approval_id}: the campaign did not confirm the decision within"
                f" {wait:g}s; it may still land: send the same decision again to learn its"
                " outcome"
            ) from exc
        except WorkflowUpdateFailedError as exc:
            repeated = _repeated(exc, approval_id)
            if repeated is None:
                return await self._landed_or_refused(exc, approval_id, approve, identity)
            return await self._noted(repeated, request)  # the answer lost on its way
        except RPCError as exc:
            if exc.status in _SETTLED:
                raise Conflict(f"approval {approval_id}: {exc.message}") from exc
            raise Unavailable(f"approval {approval_id}: Temporal: {exc.message}") from exc
        return await self._noted(result, request, decided_now=True)

    async def _noted(
        self, result: DecideResult, request: DecideRequest, *, decided_now: bool = False
    ) -> DecideResult:
        """Put a decision the campaign confirmed on the approval's record at once (the
        campaign's own record follows by an activity; both write the same): the inbox and
        a bulk decision resumed right after must not show it pending."""
        if result.remaining or decided_now:
            final: approvals.Decision = "approved" if result.decision == "approved" else "rejected"
            note = approvals.DecisionNote(
                request.approval_id,
                request.operator,
                request.reason,
                None if result.remaining else final,
                datetime.now(UTC),
            )
            refused = await self._notes.submit(note)
            if refused is not None:
                raise refused
        log.info(
            "approval decided",
            approval_id=request.approval_id,
            decision=result.decision,
            remaining=result.remaining,
        )
        return result

    async def _landed_or_refused(
        self, exc: WorkflowUpdateFailedError, approval_id: str, approve: bool, identity: Identity
    ) -> DecideResult:
        """The workflow's refusal as an operator error. A conflict may only mean the campaign
        and its record disagree for a moment: this identity's decision is landing (its
        record trails the workflow: the earlier result), or the record shows a request the
        run has not reached again, because the workflow task that asked was lost with its
        worker and is being retried (still pending here after 2 s: 503, send it again)."""
        refusal = _refused(exc)
        if not isinstance(refusal, Conflict):
            raise refusal from exc
        for _ in range(10):
            async with self._db.read_transaction() as session:
                row = await approvals.get_approval(session, approval_id)
            if row is None or row.status != "pending":
                earlier = None if row is None else _earlier(row, approve, identity)
                if earlier is None:
                    raise refusal from exc
                return earlier
            await asyncio.sleep(0.2)
        raise Unavailable(
            f"approval {approval_id}: the campaign has not caught up with this request yet"
            " (a worker is resuming it); send the decision again"
        ) from exc

    # ------------------------------------------------------------------ consent

    async def set_consent(
        self,
        customer_id: str,
        *,
        channel: str,
        purpose: str,
        granted: bool,
        source: str,
        identity: Identity,
        how: str,
        policy_version: str | None = None,
        text: str | None = None,
    ) -> ConsentOutcome:
        """Grant or revoke consent for a source customer id, then tell running campaigns.

        The decision is kept as evidence (``consent history``): ``how`` it came (api, cli),
        by the authenticated identity, with the policy version or text shown, if given. The
        ``consent_changed`` signal is owed in the same transaction (the signal outbox) and
        delivered right after the commit; what Temporal cannot take now, the relay delivers
        once it is back."""
        policy.require(identity, policy.ADMIN, "correct consent")
        _require_text("customer", customer_id, limit=200)
        _require_text("channel", channel, limit=32)
        _require_text("purpose", purpose, limit=64)
        key = self._pseudonymiser.customer_key(customer_id)
        now = datetime.now(UTC)
        change = ConsentChanged(channel=channel, purpose=purpose, granted=granted)
        held = Held()
        async with self._db.transaction() as session:
            if await customers.get_customer(session, key) is None:
                raise NotFound(f"customer: no customer {customer_id!r}", field="customer")
            evidence = consent.ConsentEvidence(how, identity.name, policy_version, text)
            changed = await consent.set_consent(
                session, key, channel, purpose, granted, source, now=now, evidence=evidence
            )
            if changed:
                record = _consent_audit(key, change, source, evidence, now)
                await audit.append_audit(session, record)
                signal = HandlerName.CONSENT_CHANGED
                owed = OwedSignal(_message_id(record), key, asdict(change), signal=signal)
                held = await self._relay.owe(session, [owed], now=now)
        delivery = await self._relay.deliver_held(held)
        return ConsentOutcome(key, changed, delivery.signalled, delivery.temporal)

    # ------------------------------------------------------------------ campaigns

    async def change_campaign(
        self, campaign_id: str, action: CampaignAction, *, identity: Identity, reason: str
    ) -> CampaignOutcome:
        """Pause, resume or cancel the outbound actions of a campaign's running workflows."""
        policy.require(identity, policy.ADMIN if action == "cancel" else policy.PAUSE, action)
        operator = identity.name
        status, kind = _ACTIONS[action]
        now = datetime.now(UTC)
        async with self._db.transaction() as session:
            campaign = await campaigns.get_campaign(session, campaign_id)
            if campaign is None:
                raise NotFound(f"campaign: no campaign {campaign_id!r}", field="campaign")
            if campaign.status == "cancelled":
                raise Conflict(f"campaign {campaign_id} is cancelled", field="campaign")
            await campaigns.set_campaign_status(session, campaign_id, status)  # type: ignore[arg-type]
            await audit.append_audit(
                session,
                audit.AuditEvent(
                    workflow_id=f"campaign:{campaign_id}",
                    step_id=f"ops:{now.isoformat()}",
                    kind=kind,
                    campaign_id=campaign_id,
                    customer_key="-",
                    payload={"operator": operator, "reason": reason},
                ),
            )
        count = 0
        if self._client is not None:
            query = visibility.running(visibility.equals(SA.CAMPAIGN_ID, campaign_id))
            if action == "cancel":
                count = await visibility.cancel_running(self._client, query)
            else:
                count = await visibility.signal_running(
                    self._client,
                    query,
                    CampaignWorkflow.pause_changed,
                    PauseChanged(paused=action == "pause", operator=operator, reason=reason),
                )
        return CampaignOutcome(campaign_id=campaign_id, status=status, workflows=count)

    # ------------------------------------------------------------------ Temporal helpers

    async def _connected(self) -> Client:
        """The client, for the default relay's signaller (which counts a failed connect as
        Temporal being unreachable)."""
        if self._client is None:
            raise RuntimeError(
                f"Temporal is not reachable at {self._settings.resolved_temporal_address}"
            )
        return self._client

    async def _require_worker(self) -> Client:
        """The client, after checking some worker polls the campaign queue (a check that
        passed stands for a few seconds: a bulk decision asks thousands of times)."""
        if self._client is None:
            raise Unavailable(
                f"Temporal is not reachable at {self._settings.resolved_temporal_address}"
            )
        if time.monotonic() - self._poller_seen < POLLER_CHECK_SECONDS:
            return self._client
        try:
            response = await self._client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=self._client.namespace,
                    task_queue=TaskQueue(name=self._settings.task_queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                )
            )
        except RPCError as exc:
            raise Unavailable(f"Temporal: {exc.message}") from exc
        if not response.pollers:
            raise Unavailable(
                f"no worker is polling task queue {self._settings.task_queue!r}: "
                "start one with `cohortflow worker` or `cohortflow up`"
            )
        self._poller_seen = time.monotonic()
        return self._client


def _consent_audit(
    key: str,
    change: ConsentChanged,
    source: str,
    evidence: consent.ConsentEvidence,
    now: datetime,
) -> audit.AuditEvent:
    """The audit row of a consent change."""
    return audit.AuditEvent(
        workflow_id=f"consent:{key}",
        step_id=f"{change.channel}:{change.purpose}:{now.isoformat()}",
        kind=AuditKind.CONSENT_GRANTED if change.granted else AuditKind.CONSENT_REVOKED,
        campaign_id="-",
        customer_key=key,
        payload={
            "channel": change.channel,
            "purpose": change.purpose,
            "source": source,
            "by": evidence.by,
            "how": evidence.how,
            "policy_version": evidence.policy_version,
        },
    )


def _message_id(record: audit.AuditEvent) -> str:
    """The outbox id of a consent change's signal: one per change, named after its audit
    row (customer, channel, purpose and time), short enough for the outbox."""
    row = f"{record.workflow_id}:{record.step_id}:{record.kind}"
    return "consent:" + hashlib.sha256(row.encode()).hexdigest()[:40]


def _repeated(exc: WorkflowUpdateFailedError, approval_id: str) -> DecideResult | None:
    """The earlier result when the workflow refused a decision as this identity's repeat."""
    cause = exc.cause
    if not (isinstance(cause, ApplicationError) and cause.type == DecideRefusal.REPEATED):
        return None
    decision, remaining = (str(cause.details[0]), int(cause.details[1]))
    return DecideResult(approval_id, decision, remaining=remaining)


def _refused(exc: WorkflowUpdateFailedError) -> Invalid | Conflict | Forbidden:
    """The ``decide`` validator's refusal as an operator error, by its type."""
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.type == DecideRefusal.INVALID:
        field = str(cause.details[0]) if cause.details else "approval_id"
        return Invalid(cause.message, field=field)
    if isinstance(cause, ApplicationError) and cause.type == DecideRefusal.FORBIDDEN:
        return Forbidden(cause.message)
    message = cause.message if isinstance(cause, FailureError) else str(exc)
    return Conflict(message, field="approval_id")


def _require_text(field: str, value: str, limit: int = _NAME_LIMIT) -> None:
    if not value or not value.strip():
        raise Invalid(f"{field}: must not be empty", field=field)
    if len(value) > limit:
        raise Invalid(f"{field}: longer than {limit} characters", field=field)


def _earlier(row: Approval, approve: bool, identity: Identity) -> DecideResult | None:
    """The result ``identity`` already got for this same decision, if it made it."""
    wanted = "approved" if approve else "rejected"
    if row.status == wanted and row.decided_by == identity.name:
        return DecideResult(row.approval_id, wanted)
    return None


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
