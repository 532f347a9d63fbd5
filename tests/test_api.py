"""The HTTP API served by uvicorn on a free port, spoken to over real HTTP, against a migrated
SQLite database and the dev server, with campaigns run by real workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cohortflow.api.app import create_app
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import approvals, campaigns, consent, customers
from cohortflow.storage.tables import Approval, AuditRow
from tests.harness import (
    FEATURES,
    Harness,
    api_settings,
    bearer,
    issue_token,
    serve_app,
    spec_document,
    wait_for_state,
    without_approval,
)
from workflows.campaign.contract import CampaignState

pytestmark = pytest.mark.devserver

KEY = "api-test-pseudonymisation-key-0123456789"


@dataclass
class Api:
    """The API's base URL and the settings it runs with."""

    url: str
    settings: Settings


@contextlib.contextmanager
def serve_api(settings: Settings) -> Iterator[Api]:
    """Run the API app under uvicorn in a thread until the block ends."""
    with serve_app(create_app(settings)) as url:
        yield Api(url, settings)


@pytest.fixture
async def api(dev_harness: Harness, dev_settings: Settings, tmp_path: Path) -> AsyncIterator[Api]:
    """The API over the harness's database, deciding through the session's dev server."""
    with serve_api(api_settings(dev_harness, dev_settings, tmp_path, KEY)) as served:
        yield served


@contextlib.asynccontextmanager
async def client_as(
    api: Api, harness: Harness, name: str, *roles: str
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the served API presenting a new token of ``name`` with ``roles``."""
    token = await issue_token(harness.db, name, *roles)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=bearer(token)) as client:
        yield client


@pytest.fixture
async def http(api: Api, dev_harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the served API, as alice: approver, operator and admin."""
    async with client_as(api, dev_harness, "alice", "approver", "operator", "admin") as client:
        yield client


async def counts(harness: Harness) -> tuple[int, list[tuple[str, str]]]:
    """The audit row count and every approval's (id, status): what an error must not change."""
    async with harness.db.transaction() as session:
        audit_rows = await session.scalar(select(func.count()).select_from(AuditRow))
        rows = await session.execute(
            select(Approval.approval_id, Approval.status).order_by(Approval.approval_id)
        )
        return int(audit_rows or 0), [(a, s) for a, s in rows]


async def stored_customer(harness: Harness, source_id: str) -> str:
    """A customer stored under the key the API's pseudonymiser gives ``source_id``."""
    key = Pseudonymiser(KEY.encode()).customer_key(source_id)
    async with harness.db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(key, source_id, f"{source_id}@example.com")]
        )
        await customers.upsert_features(session, [(key, dict(FEATURES), datetime.now(UTC))])
        await consent.set_consent(session, key, "email", "marketing", True, "tests")
    return key


def with_wait(document: dict[str, Any], duration: str) -> dict[str, Any]:
    steps = [{**s, "duration": duration} if s["type"] == "wait" else s for s in document["steps"]]
    return {**document, "steps": steps}


def error_loc(response: httpx.Response) -> list[list[Any]]:
    return [d["loc"] for d in response.json()["detail"]]


async def test_healthz_answers_over_http_without_a_token(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        response = await anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_approvals_list_decide_and_every_bad_decision(
    api: Api, dev_harness: Harness, http: httpx.AsyncClient
) -> None:
    spec, version = await dev_harness.apply(with_wait(spec_document(), "PT1S"))
    key = await dev_harness.customer()
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert status.pending_approval is not None
        approval_id = status.pending_approval.approval_id

        listed = await http.get("/v1/approvals")
        assert listed.status_code == 200, listed.text
        [row] = listed.json()
        assert row["approval_id"] == approval_id
        assert row["customer_key"] == key
        assert row["status"] == "pending"
        assert row["reason"] == "test approval"
        assert row["scores"]["churn"] == pytest.approx(status.scores["churn"])

        owner_token = await issue_token(dev_harness.db, "crm-team", "approver")
        bob_token = await issue_token(dev_harness.db, "bob", "approver")
        before = await counts(dev_harness)
        decision = f"/v1/approvals/{approval_id}/decision"
        good = {"decision": "approve", "reason": "within budget"}

        unknown = await http.post("/v1/approvals/apr_000000000000/decision", json=good)
        assert unknown.status_code == 404
        assert error_loc(unknown) == [["path", "approval_id"]]
        assert "apr_000000000000" in unknown.json()["detail"][0]["msg"]

        malformed = {
            "reason": {"decision": "approve"},
            "decision": {**good, "decision": "maybe"},
            "operator": {**good, "operator": "bob"},  # a forged name is refused, not used
        }
        for field, body in malformed.items():
            response = await http.post(decision, json=body)
            assert response.status_code == 422, (field, response.text)
            assert ["body", field] in error_loc(response), (field, response.json())

        own = await http.post(decision, json=good, headers=bearer(owner_token))
        assert own.status_code == 403
        assert "crm-team" in own.json()["detail"][0]["msg"]

        assert await counts(dev_harness) == before
        still = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert still.pending_approval is not None

        approved = await http.post(decision, json=good)
        assert approved.status_code == 200, approved.text
        assert approved.json() == {
            "approval_id": approval_id,
            "decision": "approved",
            "remaining": 0,
        }
        result = await dev_harness.result(handle)
        assert result.state == CampaignState.COMPLETED

        after = await counts(dev_harness)
        assert after[1] == [(approval_id, "approved")]
        # The same decision sent again by its maker (a client retrying after a timeout)
        # gets the earlier result; nothing is decided twice.
        retried = await http.post(decision, json=good)
        assert (retried.status_code, retried.json()) == (200, approved.json())
        assert await counts(dev_harness) == after
        again = await http.post(decision, json=good, headers=bearer(bob_token))
        assert again.status_code == 409
        assert error_loc(again) == [["path", "approval_id"]]
        assert "approved" in again.json()["detail"][0]["msg"]
        assert await counts(dev_harness) == after

        decided = await http.get("/v1/approvals", params={"status": "approved"})
        assert [r["decided_by"] for r in decided.json()] == ["alice"]
        assert (await http.get("/v1/approvals")).json() == []


async def test_expired_approval_is_409_and_no_worker_polling_is_503(
    http: httpx.AsyncClient, dev_harness: Harness
) -> None:
    now = datetime.now(UTC)
    async with dev_harness.db.transaction() as session:
        for approval_id, expires in (
            ("apr_0123456789ab", now + timedelta(days=1)),
            ("apr_expired00000", now - timedelta(minutes=1)),
        ):
            await approvals.add_pending(
                session,
                approval_id=approval_id,
                workflow_id=f"campaign:c:k:{approval_id}",
                step_id="approve",
                campaign_id="c",
                customer_key="c_0123",
                reason="test",
                scores={},
                requested_at=now - timedelta(days=1),
                expires_at=expires,
            )
    before = await counts(dev_harness)
    good = {"decision": "approve", "reason": "ok"}

    expired = await http.post("/v1/approvals/apr_expired00000/decision", json=good)
    assert expired.status_code == 409
    assert error_loc(expired) == [["path", "approval_id"]]
    assert "expired" in expired.json()["detail"][0]["msg"]

    # Nothing ever polled this test's task queue: say so instead of hanging.
    response = await http.post("/v1/approvals/apr_0123456789ab/decision", json=good)
    assert response.status_code == 503
    assert dev_harness.settings.task_queue in response.json()["detail"][0]["msg"]
    assert await counts(dev_harness) == before


async def test_consent_unknown_customer_is_404_and_nothing_is_written(
    http: httpx.AsyncClient, dev_harness: Harness
) -> None:
    before = await counts(dev_harness)
    response = await http.post(
        "/v1/consent",
        json={
            "customer_id": "nobody-42",
            "channel": "email",
            "purpose": "marketing",
            "granted": False,
        },
    )
    assert response.status_code == 404
    assert error_loc(response) == [["body", "customer_id"]]
    assert "nobody-42" in response.json()["detail"][0]["msg"]
    assert await counts(dev_harness) == before


async def test_consent_revoke_stops_a_waiting_campaign_at_once(
    api: Api, dev_harness: Harness
) -> None:
    spec, version = await dev_harness.apply(with_wait(without_approval(spec_document()), "PT1H"))
    source_id = f"cust-{uuid.uuid4().hex[:8]}"
    key = await stored_customer(dev_harness, source_id)
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        query = f'CustomerKey = "{key}" AND ExecutionStatus = "Running"'
        for _ in range(50):
            if (await dev_harness.client.count_workflows(query)).count == 1:
                break
            await asyncio.sleep(0.1)
        started = time.monotonic()
        async with client_as(api, dev_harness, "dpo", "admin") as http:
            response = await http.post(
                "/v1/consent",
                json={
                    "customer_id": source_id,
                    "channel": "email",
                    "purpose": "marketing",
                    "granted": False,
                    "policy_version": "privacy-2026-11",
                    "text": "Offers by e-mail, at most weekly.",
                },
            )
        assert response.status_code == 200, response.text
        told = {"signalled_campaigns": 1, "temporal": "ok"}
        assert response.json() == {"customer_key": key, "changed": True, **told}
        result = await dev_harness.result(handle)
        took = time.monotonic() - started

    assert result.state == CampaignState.CONSENT_BLOCKED
    assert took < 30  # the wait was an hour
    async with dev_harness.db.transaction() as session:
        assert not await consent.has_consent(session, key, "email", "marketing")
        revoked = await session.scalar(
            select(func.count())
            .select_from(AuditRow)
            .where(AuditRow.customer_key == key, AuditRow.kind == "consent_revoked")
        )
        # The revocation is evidence: who (the token's identity), how, and what was shown.
        [evidence] = [h for h in await consent.history(session, key) if not h.granted]
    assert revoked == 1
    assert (evidence.how, evidence.by, evidence.source) == ("api", "dpo", "api")
    assert (evidence.policy_version, evidence.text, evidence.changed) == (
        "privacy-2026-11",
        "Offers by e-mail, at most weekly.",
        True,
    )
    assert dev_harness.sandbox.attempts(f"{handle.id}:enrol") == 0


async def test_campaign_pause_over_http(http: httpx.AsyncClient, dev_harness: Harness) -> None:
    spec, _ = await dev_harness.apply(spec_document())
    response = await http.post(
        f"/v1/campaigns/{spec.campaign_id}/pause",
        json={"reason": "copy review"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"campaign_id": spec.campaign_id, "status": "paused", "workflows": 0}
    async with dev_harness.db.transaction() as session:
        campaign = await campaigns.get_campaign(session, spec.campaign_id)
    assert campaign is not None and campaign.status == "paused"

    before = await counts(dev_harness)
    unknown = await http.post("/v1/campaigns/no_such_campaign/pause", json={})
    assert unknown.status_code == 404
    assert error_loc(unknown) == [["path", "campaign_id"]]
    assert await counts(dev_harness) == before
