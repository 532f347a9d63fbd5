"""Four eyes, over the HTTP API and the CLI, against real campaigns on the dev server: the
owner, the version's author and whoever applied it may not approve; a spec may ask for N
distinct approvers and one rejection ends it; approve and reject may take different roles;
an approver's token reaches only the campaigns of its scope."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from cohortflow.api.app import create_app
from cohortflow.settings import Settings
from cohortflow.storage import approvals
from cohortflow.storage.tables import AuditRow
from tests.harness import (
    Harness,
    bearer,
    issue_token,
    serve_app,
    spec_document,
    wait_for_state,
)
from workflows.campaign.contract import CampaignState

pytestmark = pytest.mark.devserver

REPO = Path(__file__).resolve().parents[1]
KEY = "four-eyes-test-pseudonymisation-key-0123"
DECIDE = {"decision": "approve", "reason": "within budget"}


@pytest.fixture
def settings(dev_harness: Harness, dev_settings: Settings, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "api",
        database_url=dev_harness.db.url,
        temporal_port=dev_settings.temporal_port,
        task_queue=dev_harness.settings.task_queue,
        pseudonymisation_key=KEY,
    )


@pytest.fixture
async def api_url(settings: Settings) -> AsyncIterator[str]:
    with serve_app(create_app(settings)) as url:
        yield url


def two_approvers(**approval: Any) -> dict[str, Any]:
    """The test campaign, written by carol and tagged winback, waiting for two approvers."""
    document = spec_document(author="carol", tags=["winback"])
    document["steps"] = [  # the campaign's hour-long wait, a second here: the test waits out
        {**step, "duration": "PT1S"} if step["type"] == "wait" else step
        for step in document["steps"]
    ]
    del document["approval"]  # the spec also reads it by the plural, as the issue spells it
    document["approvals"] = {"timeout": "P3D", "on_timeout": "reject", "required": 2, **approval}
    return document


async def awaiting(harness: Harness, document: dict[str, Any]) -> tuple[Any, str]:
    """Launch the campaign for a new customer; its handle and approval id once it asks."""
    spec, version = await harness.apply(document)
    handle = await harness.launch(spec, version, await harness.customer())
    status = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
    assert status.pending_approval is not None
    return handle, status.pending_approval.approval_id


async def decide(url: str, token: str, approval_id: str, **body: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(token)) as http:
        return await http.post(f"/v1/approvals/{approval_id}/decision", json={**DECIDE, **body})


def refusal(response: httpx.Response) -> str:
    return str(response.json()["detail"][0]["msg"])


async def test_two_distinct_approvers_neither_author_applier_nor_owner_over_the_api(
    api_url: str, dev_harness: Harness
) -> None:
    db = dev_harness.db
    async with dev_harness.workers():
        handle, approval_id = await awaiting(dev_harness, two_approvers())
        for name, why in (("carol", "authored or applied"), ("tests", "authored or applied"),
                          ("crm-team", "requested this campaign")):  # fmt: skip
            barred = await decide(api_url, await issue_token(db, name, "approver"), approval_id)
            assert barred.status_code == 403, barred.text
            assert why in refusal(barred)
        dave = await issue_token(db, "dave", "operator")
        no_role = await decide(api_url, dave, approval_id)
        assert no_role.status_code == 403
        assert refusal(no_role) == "operator: dave needs role approver to approve"

        alice = await issue_token(db, "alice", "approver")
        first = await decide(api_url, alice, approval_id)
        assert first.json() == {"approval_id": approval_id, "decision": "approved", "remaining": 1}
        twice = await decide(api_url, alice, approval_id)
        assert twice.status_code == 403
        assert "already approved" in refusal(twice)
        async with db.transaction() as session:
            row = await approvals.get_approval(session, approval_id)
            assert row is not None and (row.status, row.approved_by) == ("pending", ["alice"])
        assert (await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)).pending_approval

        bob = await issue_token(db, "bob", "approver")
        second = await decide(api_url, bob, approval_id, reason="agreed")
        assert second.json() == {"approval_id": approval_id, "decision": "approved", "remaining": 0}
        result = await dev_harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    async with db.transaction() as session:
        decided = await session.scalar(
            select(AuditRow.payload).where(
                AuditRow.workflow_id == handle.id, AuditRow.kind == "approval_decided"
            )
        )
        row = await approvals.get_approval(session, approval_id)
    assert decided is not None and '"approved_by":["alice","bob"]' in decided
    assert '"operator":"bob"' in decided
    assert row is not None and (row.status, row.decided_by) == ("approved", "bob")


async def test_one_rejection_ends_it_and_reject_may_take_another_role(
    api_url: str, dev_harness: Harness
) -> None:
    db = dev_harness.db
    document = two_approvers(reject_roles=["operator", "approver"])
    async with dev_harness.workers():
        handle, approval_id = await awaiting(dev_harness, document)
        dave = await issue_token(db, "dave", "operator")
        assert (await decide(api_url, dave, approval_id)).status_code == 403
        alice = await issue_token(db, "alice", "approver")
        assert (await decide(api_url, alice, approval_id)).json()["remaining"] == 1
        rejected = await decide(
            api_url, dave, approval_id, decision="reject", reason="too generous"
        )
        assert rejected.json() == {
            "approval_id": approval_id,
            "decision": "rejected",
            "remaining": 0,
        }
        result = await dev_harness.result(handle)
    assert result.state == CampaignState.REJECTED
    assert result.reason == "rejected by dave"


async def test_an_approver_token_reaches_only_the_campaigns_of_its_scope(
    api_url: str, dev_harness: Harness
) -> None:
    db = dev_harness.db
    async with dev_harness.workers():
        handle, approval_id = await awaiting(dev_harness, two_approvers(required=1))
        elsewhere = await issue_token(db, "erin", "approver", campaigns=["some_other_campaign"])
        refused = await decide(api_url, elsewhere, approval_id)
        assert refused.status_code == 403
        assert "does not reach campaign" in refusal(refused)
        by_tag = await issue_token(db, "frank", "approver", tags=["winback"])
        assert (await decide(api_url, by_tag, approval_id)).status_code == 200
        assert (await dev_harness.result(handle)).state == CampaignState.COMPLETED


async def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``cohortflow ARGS`` against the test's database and dev server, with ``env`` set; in
    a thread, so the in-process worker keeps answering while the command waits for it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    configured = {
        "COHORTFLOW_DATABASE_URL": settings.resolved_database_url,
        "COHORTFLOW_TEMPORAL_PORT": str(settings.temporal_port),
        "COHORTFLOW_TASK_QUEUE": settings.task_queue,
        "COHORTFLOW_PSEUDONYMISATION_KEY": KEY,
        "PYTHONPATH": str(REPO),
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cohortflow", *args],
        capture_output=True,
        text=True,
        env=clean | configured | env,
        timeout=120,
    )


async def test_the_same_rules_over_the_cli_as_a_token_or_the_local_identity(
    settings: Settings, dev_harness: Harness
) -> None:
    async with dev_harness.workers():
        handle, approval_id = await awaiting(dev_harness, two_approvers())
        approve = ("approve", approval_id, "--reason", "fine")
        applier = await cli(settings, *approve, COHORTFLOW_LOCAL_IDENTITY="tests")
        assert applier.returncode == 2
        assert "tests authored or applied version 1" in applier.stderr
        assert len(applier.stderr.strip().splitlines()) == 1
        alice = await issue_token(dev_harness.db, "alice", "approver")
        first = await cli(settings, *approve, COHORTFLOW_TOKEN=alice)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == f"{approval_id} approved; 1 more approval(s) needed"
        again = await cli(settings, *approve, COHORTFLOW_LOCAL_IDENTITY="alice")
        assert again.returncode == 2
        assert "alice has already approved" in again.stderr
        no_role = await cli(
            settings,
            *approve,
            COHORTFLOW_LOCAL_IDENTITY="bob",
            COHORTFLOW_LOCAL_ROLES='["operator"]',
        )
        assert no_role.returncode == 2
        assert "bob needs role approver to approve" in no_role.stderr
        second = await cli(settings, *approve, COHORTFLOW_LOCAL_IDENTITY="bob")
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == f"{approval_id} approved"
        assert (await dev_harness.result(handle)).state == CampaignState.COMPLETED
