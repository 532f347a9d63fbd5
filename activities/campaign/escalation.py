"""Escalating an approval request nobody has answered as its expiry nears.

``escalate_approval`` posts a notice to the configured webhook (signed, with an idempotency
key, carrying ids and times only, never personal data), then records the escalation in one
transaction: the audit row, with what became of the notice, and the approval row's
``escalated_at``, which the inbox and the API show. A webhook that keeps failing is given up
after a few attempts and the escalation is recorded all the same: a notice is no reason to
hold the campaign. The database is retried as every activity's is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.campaign.audit import append_decisions, append_row
from cohortflow.storage import approvals
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import EscalationInput, EscalationResult
from workflows.campaign.contract import ActivityName, AuditKind

# Attempts at the webhook before the escalation is recorded as not delivered.
WEBHOOK_ATTEMPTS = 5
SIGNATURE_HEADER = "X-Cohortflow-Signature"
TIMESTAMP_HEADER = "X-Cohortflow-Timestamp"


@dataclass(frozen=True)
class EscalationWebhook:
    """Where notices go; ``secret`` signs them; ``public_url`` makes their inbox links
    absolute."""

    url: str
    secret: str | None = None
    public_url: str | None = None
    timeout_seconds: float = 10.0


def notice_body(inp: EscalationInput, public_url: str | None) -> dict[str, str]:
    """The JSON a notice carries: ids, the step, the reason and times; nothing personal (the
    customer key is already a pseudonym)."""
    pending = inp.approval
    link = f"/inbox/approvals/{pending.approval_id}"
    return {
        "event": "approval.escalated",
        "approval_id": pending.approval_id,
        "campaign_id": inp.campaign_id,
        "workflow_id": inp.workflow_id,
        "customer_key": inp.customer_key,
        "step_id": pending.step_id,
        "reason": pending.reason,
        "requested_at": pending.requested_at,
        "expires_at": pending.expires_at,
        "escalated_at": pending.escalated_at,
        "inbox_url": (public_url or "").rstrip("/") + link,
    }


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` the hex HMAC-SHA256 of ``<timestamp>.<body>``: what a receiver recomputes
    (and compares in constant time) to know the notice is ours and fresh."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class EscalationActivities:
    """Escalation notices, bound to the database and the webhook (``None``: none set)."""

    def __init__(self, db: Database, webhook: EscalationWebhook | None) -> None:
        self._db = db
        self._webhook = webhook

    @activity.defn(name=ActivityName.ESCALATE_APPROVAL)
    async def escalate_approval(self, inp: EscalationInput) -> EscalationResult:
        """Send the notice, then record the escalation and the decisions riding with it."""
        outcome = await self._notify(inp)
        pending = inp.approval
        payload = {"expires_at": pending.expires_at, "webhook": outcome}
        async with self._db.transaction() as session:
            await append_decisions(
                session, inp.workflow_id, inp.campaign_id, inp.customer_key, inp.decisions
            )
            await append_row(
                session,
                inp.workflow_id,
                pending.step_id,
                AuditKind.APPROVAL_ESCALATED,
                inp.campaign_id,
                inp.customer_key,
                payload,
            )
            at = datetime.fromisoformat(pending.escalated_at)
            await approvals.mark_escalated(session, pending.approval_id, at)
        return EscalationResult(outcome, decisions_recorded=len(inp.decisions))

    async def _notify(self, inp: EscalationInput) -> str:
        hook = self._webhook
        if hook is None:
            return "not configured"
        body = json.dumps(notice_body(inp, hook.public_url), sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f"{inp.approval.approval_id}:escalated",
            TIMESTAMP_HEADER: timestamp,
        }
        if hook.secret:
            headers[SIGNATURE_HEADER] = signature(hook.secret, timestamp, body)
        try:
            async with httpx.AsyncClient(timeout=hook.timeout_seconds) as http:
                response = await http.post(hook.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return _again_or(f"failed: {type(exc).__name__}")
        status = response.status_code
        if status < 300:
            return "delivered"
        if status in (408, 429) or status >= 500:
            return _again_or(f"failed: HTTP {status}")
        return f"refused: HTTP {status}"


def _again_or(why: str) -> str:
    """Raise to be retried while attempts remain; then ``why`` is what the audit records."""
    if activity.info().attempt < WEBHOOK_ATTEMPTS:
        raise ApplicationError(f"escalation webhook {why}", type="WebhookUnavailable")
    return why
