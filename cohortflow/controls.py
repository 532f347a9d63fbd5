"""What operators do: decide approvals, change consent, pause, resume or cancel campaigns.

The CLI and the HTTP API both call these; they talk to Temporal through the client and to
the database through storage. Every request is validated before anything is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import FailureError
from temporalio.service import RPCError, RPCStatusCode

from cohortflow.errors import Conflict, Invalid, NotFound, Unavailable
from cohortflow.ids import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import approvals, audit, campaigns, consent, customers
from cohortflow.storage.db import Database
from cohortflow.storage.tables import Approval
from workflows.messages import (
    ConsentChanged,
    DecideRequest,
    DecideResult,
    PauseChanged,
)

log = structlog.get_logger(__name__)

CampaignAction = Literal["pause", "resume", "cancel"]
_NAME_LIMIT = 128


@dataclass(frozen=True)
class ConsentOutcome:
    """What a consent change did."""

    customer_key: str
    changed: bool
    signalled: int


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
    ) -> None:
        self._db = db
        self._settings = settings
        self._pseudonymiser = pseudonymiser
        self._client = client

    # ------------------------------------------------------------------ approvals

    async def list_approvals(self, status: str | None = "pending") -> list[Approval]:
        """Approvals, newest first; ``status`` None lists all."""
        if status not in (None, "pending", "approved", "rejected", "expired"):
            raise Invalid(f"status: unknown status {status!r}", field="status")
        async with self._db.transaction() as session:
            rows = await approvals.list_approvals(session, status=status)
        return sorted(rows, key=lambda a: a.requested_at, reverse=True)

    async def decide(
        self, approval_id: str, *, approve: bool, operator: str, reason: str
    ) -> DecideResult:
        """Approve or reject a pending approval through the campaign's ``decide`` update."""
        _require_text("operator", operator)
        _require_text("reason", reason, limit=1000)
        async with self._db.transaction() as session:
            row = await approvals.get_approval(session, approval_id)
        if row is None:
            raise NotFound(f"approval_id: no approval {approval_id!r}", field="approval_id")
        if row.status != "pending":
            raise Conflict(f"approval {approval_id} is already {row.status}", field="approval_id")
        if _aware(row.expires_at) <= datetime.now(UTC):
            raise Conflict(
                f"approval {approval_id} expired at {row.expires_at:%Y-%m-%d %H:%M}Z",
                field="approval_id",
            )
        client = await self._require_worker()
        handle = client.get_workflow_handle(row.workflow_id)
        try:
            result: DecideResult = await handle.execute_update(
                "decide",
                DecideRequest(approval_id, approve, operator.strip(), reason.strip()),
                result_type=DecideResult,
            )
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            message = cause.message if isinstance(cause, FailureError) else str(exc)
            if message.startswith(("operator:", "reason:")):
                raise Invalid(message, field=message.split(":", 1)[0]) from exc
            raise Conflict(message, field="approval_id") from exc
        except RPCError as exc:
            raise Conflict(f"approval {approval_id}: {exc.message}") from exc
        log.info("approval decided", approval_id=approval_id, decision=result.decision)
        return result

    # ------------------------------------------------------------------ consent

    async def set_consent(
        self, customer_id: str, *, channel: str, purpose: str, granted: bool, source: str
    ) -> ConsentOutcome:
        """Grant or revoke consent for a source customer id, then tell running campaigns."""
        _require_text("customer", customer_id, limit=200)
        _require_text("channel", channel, limit=32)
        _require_text("purpose", purpose, limit=64)
        key = self._pseudonymiser.customer_key(customer_id)
        now = datetime.now(UTC)
        async with self._db.transaction() as session:
            if await customers.get_customer(session, key) is None:
                raise NotFound(f"customer: no customer {customer_id!r}", field="customer")
            changed = await consent.set_consent(
                session, key, channel, purpose, granted, source, now=now
            )
            if changed:
                await audit.append_audit(
                    session,
                    audit.AuditEvent(
                        workflow_id=f"consent:{key}",
                        step_id=f"{channel}:{purpose}:{now.isoformat()}",
                        kind="consent_granted" if granted else "consent_revoked",
                        campaign_id="-",
                        customer_key=key,
                        payload={"channel": channel, "purpose": purpose, "source": source},
                    ),
                )
        signalled = 0
        if changed and self._client is not None:
            signalled = await self._signal_running(
                f'CustomerKey = "{key}"',
                "consent_changed",
                ConsentChanged(channel=channel, purpose=purpose, granted=granted),
            )
        return ConsentOutcome(customer_key=key, changed=changed, signalled=signalled)

    # ------------------------------------------------------------------ campaigns

    async def change_campaign(
        self, campaign_id: str, action: CampaignAction, *, operator: str, reason: str
    ) -> CampaignOutcome:
        """Pause, resume or cancel the outbound actions of a campaign's running workflows."""
        _require_text("operator", operator)
        status = {"pause": "paused", "resume": "active", "cancel": "cancelled"}[action]
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
                    kind=f"campaign_{status}",
                    campaign_id=campaign_id,
                    customer_key="-",
                    payload={"operator": operator, "reason": reason},
                ),
            )
        query = f'CampaignId = "{campaign_id}"'
        if action == "cancel":
            count = await self._cancel_running(query)
        else:
            count = await self._signal_running(
                query,
                "pause_changed",
                PauseChanged(paused=action == "pause", operator=operator, reason=reason),
            )
        return CampaignOutcome(campaign_id=campaign_id, status=status, workflows=count)

    # ------------------------------------------------------------------ Temporal helpers

    async def _require_worker(self) -> Client:
        """The client, after checking some worker polls the campaign queue."""
        if self._client is None:
            raise Unavailable(
                f"Temporal is not reachable at {self._settings.resolved_temporal_address}"
            )
        response = await self._client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=self._client.namespace,
                task_queue=TaskQueue(name=self._settings.task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
        if not response.pollers:
            raise Unavailable(
                f"no worker is polling task queue {self._settings.task_queue!r}: "
                "start one with `cohortflow worker` or `cohortflow up`"
            )
        return self._client

    async def _running(self, query: str) -> list[str]:
        if self._client is None:
            return []
        full = f'{query} AND ExecutionStatus = "Running"'
        return [wf.id async for wf in self._client.list_workflows(full)]

    async def _signal_running(self, query: str, signal: str, arg: object) -> int:
        return await self._each_running(query, lambda h: h.signal(signal, arg))

    async def _cancel_running(self, query: str) -> int:
        return await self._each_running(query, lambda h: h.cancel())

    async def _each_running(
        self, query: str, act: Callable[[WorkflowHandle[Any, Any]], Awaitable[None]]
    ) -> int:
        """Apply ``act`` to every running workflow matching ``query``; count those reached.

        A workflow that closes between the listing and the call is simply not counted: the
        store change that prompted the call has already been made and stays valid.
        """
        client = self._client
        if client is None:
            return 0

        async def one(workflow_id: str) -> bool:
            try:
                await act(client.get_workflow_handle(workflow_id))
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                return False
            return True

        reached = await asyncio.gather(*(one(i) for i in await self._running(query)))
        return sum(reached)


def _require_text(field: str, value: str, limit: int = _NAME_LIMIT) -> None:
    if not value or not value.strip():
        raise Invalid(f"{field}: must not be empty", field=field)
    if len(value) > limit:
        raise Invalid(f"{field}: longer than {limit} characters", field=field)


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
