"""Escalation before expiry, on the dev server: a request still unanswered
``approval.escalate_before`` its expiry is escalated once (across a continuation too), on
record, beside the request in the API, the CLI's JSON and the Temporal UI's details, and as a
signed notice to the webhook, which a failing receiver does not turn into a business
outcome."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr, ValidationError
from sqlalchemy import select

from activities.campaign.escalation import WEBHOOK_ATTEMPTS
from cohortflow.api.app import create_app
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage import approvals
from cohortflow.storage.tables import AuditRow
from tests.harness import (
    Harness,
    api_settings,
    bearer,
    current_details,
    issue_token,
    push_until_continued,
    save_history_if_asked,
    serve_app,
    spec_document,
    status_of,
    wait_for_state,
)
from workflows.campaign.contract import CampaignState
from workflows.campaign.workflow import CampaignWorkflow

pytestmark = pytest.mark.devserver

SECRET = "escalation-test-secret"


@dataclass
class Receiver:
    """A webhook receiver: what it was sent, and the status it answers with."""

    url: str
    answer: int = 204
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def until(self, count: int, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"{len(self.got)} notices, not {count}"
            await asyncio.sleep(0.1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    app = FastAPI(title="escalation receiver")
    state = Receiver(url="")

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        state.got.append((dict(request.headers), await request.body()))
        return Response(status_code=state.answer)

    with serve_app(app) as url:
        state.url = f"{url}/hook"
        yield state


def escalating(**approval: Any) -> dict[str, Any]:
    """The test campaign: its approval expires after 12 s and escalates 9 s before."""
    document = spec_document()
    document["steps"] = [
        {**step, "duration": "PT1S"} if step["type"] == "wait" else step
        for step in document["steps"]
    ]
    document["approval"] = {"timeout": "PT12S", "escalate_before": "PT9S", **approval}
    return document


def notifying(harness: Harness, receiver: Receiver) -> None:
    harness.settings = harness.settings.model_copy(
        update={
            "escalation_webhook_url": receiver.url,
            "escalation_webhook_secret": SecretStr(SECRET),
            "public_url": "https://cohortflow.example",
        }
    )


async def escalations(harness: Harness, workflow_id: str) -> list[dict[str, Any]]:
    async with harness.db.transaction() as session:
        rows = await session.scalars(
            select(AuditRow.payload).where(
                AuditRow.workflow_id == workflow_id, AuditRow.kind == "approval_escalated"
            )
        )
        return [json.loads(p) for p in rows.all()]


async def test_escalated_once_across_a_continuation_signed_and_shown(
    dev_harness: Harness, receiver: Receiver
) -> None:
    notifying(dev_harness, receiver)
    spec, version = await dev_harness.apply(escalating())
    key = await dev_harness.customer()
    async with dev_harness.workers():
        started = await dev_harness.start(spec, version, key, history_limit=45)
        handle = dev_harness.client.get_workflow_handle_for(CampaignWorkflow.run, started.id)
        asked = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert asked.pending_approval is not None
        approval_id = asked.pending_approval.approval_id
        await receiver.until(1)
        async with dev_harness.db.transaction() as session:
            row = await approvals.get_approval(session, approval_id)
        details = await current_details(handle)
        await push_until_continued(handle, 2)  # the continuation must not escalate again
        resumed = await status_of(handle)
        result = await dev_harness.result(handle)
        await save_history_if_asked(handle, "escalated_continued_expired")

    assert result.state == CampaignState.REJECTED
    assert len(receiver.got) == 1
    headers, body = receiver.got[0]
    signed = f"{headers['x-cohortflow-timestamp']}.".encode() + body
    expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert headers["x-cohortflow-signature"] == f"sha256={expected}"
    assert headers["idempotency-key"] == f"{approval_id}:escalated"
    notice = json.loads(body)
    assert notice["event"] == "approval.escalated"
    assert (notice["approval_id"], notice["customer_key"]) == (approval_id, key)
    assert notice["inbox_url"] == f"https://cohortflow.example/inbox/approvals/{approval_id}"
    assert f"src-{key}" not in body.decode() and "@example.com" not in body.decode()
    # Escalated 9 s before a 12 s expiry: about 3 s after it was asked.
    pending = asked.pending_approval
    assert notice["expires_at"] == pending.expires_at
    assert resumed.pending_approval is not None and resumed.pending_approval.escalated_at
    assert resumed.runs >= 2
    assert row is not None and row.escalated_at is not None
    waited = row.escalated_at - row.requested_at
    assert 2.5 <= waited.total_seconds() < 9, waited
    assert "Escalated" in details and "escalated, unanswered until" in details
    assert await escalations(dev_harness, handle.id) == [
        {"expires_at": pending.expires_at, "webhook": "delivered"}
    ]


async def test_a_failing_webhook_is_given_up_and_the_decision_still_lands(
    dev_harness: Harness, dev_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.answer = 503
    notifying(dev_harness, receiver)
    settings = api_settings(dev_harness, dev_settings, tmp_path, "escalation-test-key-0123456789")
    spec, version = await dev_harness.apply(escalating(timeout="PT60S", escalate_before="PT58S"))
    key = await dev_harness.customer()
    alice = await issue_token(dev_harness.db, "alice", "approver")
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        asked = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert asked.pending_approval is not None
        approval_id = asked.pending_approval.approval_id
        await receiver.until(WEBHOOK_ATTEMPTS, limit=60)  # retried 1+2+4+8 s apart, then given up
        with serve_app(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, headers=bearer(alice), timeout=60) as http:
                for _ in range(100):  # the escalation goes on record once the webhook is given up
                    shown = (await http.get(f"/v1/approvals/{approval_id}")).json()
                    if shown["approval"]["escalated_at"]:
                        break
                    await asyncio.sleep(0.2)
                await http.post("/inbox/login", data={"token": alice})
                page = (await http.get(f"/inbox/approvals/{approval_id}")).text
                decided = await http.post(
                    f"/v1/approvals/{approval_id}/decision",
                    json={"decision": "approve", "reason": "late but fine"},
                )
        result = await dev_harness.result(handle)
        await save_history_if_asked(handle, "escalation_webhook_failed_approved")

    assert decided.status_code == 200, decided.text
    assert result.state == CampaignState.COMPLETED
    assert shown["approval"]["escalated_at"] is not None
    assert 'id="escalated"' in page and "unanswered as its expiry neared" in page
    assert len(receiver.got) == WEBHOOK_ATTEMPTS
    assert len({h["idempotency-key"] for h, _ in receiver.got}) == 1  # one notice, resent
    assert await escalations(dev_harness, handle.id) == [
        {"expires_at": asked.pending_approval.expires_at, "webhook": "failed: HTTP 503"}
    ]


def test_escalation_the_spec_cannot_take_is_refused_by_field() -> None:
    with pytest.raises(ValidationError) as refused:
        CampaignSpec.model_validate(escalating(timeout="PT1H", escalate_before="PT1H"))
    (error,) = refused.value.errors()
    assert error["loc"] == ("approval",)
    assert "escalate_before 'PT1H' must be shorter than timeout 'PT1H'" in error["msg"]
    with pytest.raises(ValidationError) as negative:
        CampaignSpec.model_validate(escalating(escalate_before="PT0S"))
    assert negative.value.errors()[0]["loc"] == ("approval", "escalate_before")
