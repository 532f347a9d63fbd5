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
from sqlalchemy import func, select

from cohortflow.api.app import create_app
from cohortflow.settings import Settings
from cohortflow.storage import approvals
from cohortflow.storage.tables import AuditRow
from tests.conftest import TEST_PAYLOAD_KEYS
from tests.harness import (
    Harness,
    api_settings,
    bearer,
    issue_token,
    save_history_if_asked,
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
    return api_settings(dev_harness, dev_settings, tmp_path, KEY)


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
        # Alice again (a retry after a lost answer): her earlier result; she counts once.
        twice = await decide(api_url, alice, approval_id)
        assert twice.status_code == 200, twice.text
        assert twice.json() == first.json()
        rejects = await decide(api_url, alice, approval_id, decision="reject")
        assert rejects.status_code == 403
        assert "already approved" in refusal(rejects)
        async with db.transaction() as session:
            row = await approvals.get_approval(session, approval_id)
            assert row is not None and (row.status, row.approved_by) == ("pending", ["alice"])
        assert (await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)).pending_approval

        bob = await issue_token(db, "bob", "approver")
        second = await decide(api_url, bob, approval_id, reason="agreed")
        assert second.json() == {"approval_id": approval_id, "decision": "approved", "remaining": 0}
        result = await dev_harness.result(handle)
        await save_history_if_asked(handle, "two_approvers_completed")
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
        await save_history_if_asked(handle, "one_of_two_then_rejected")
    assert result.state == CampaignState.REJECTED
    assert result.reason == "rejected by dave"


async def test_an_approver_token_reaches_only_the_campaigns_of_its_scope(
    api_url: str, dev_harness: Harness
) -> None:
    db = dev_harness.db
    async with dev_harness.workers():
        handle, approval_id = await awaiting(dev_harness, two_approvers(required=1))
        reader = bearer(await issue_token(db, "olga", "operator"))
        async with httpx.AsyncClient(base_url=api_url, timeout=30, headers=reader) as http:
            context = (await http.get(f"/v1/approvals/{approval_id}")).json()
            assert (await http.get("/v1/approvals/apr_000000000000")).status_code == 404
        assert context["approval"]["approval_id"] == approval_id
        assert (context["cohort_id"], context["campaign_version"]) == ("test_cohort", 1)
        assert set(context["model_versions"]) == {"churn"}
        assert context["top_contributions"]["churn"], context  # the features behind the score
        assert [(p["step_id"], p["action"], p["target"]) for p in context["proposed"]] == [
            ("label", "set_properties", ""),
            ("enrol", "enroll_sequence", "winback"),
        ]
        assert 3 * 86400 - 120 < context["expires_in_seconds"] <= 3 * 86400
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
        "COHORTFLOW_PAYLOAD_KEYS": TEST_PAYLOAD_KEYS,
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
        shown = await cli(settings, "approvals", "show", approval_id)
        assert shown.returncode == 0, shown.stderr
        assert f"{approval_id}  pending  campaign" in shown.stdout
        assert "then enrol: enroll_sequence winback" in shown.stdout
        assert all(len(line) <= 80 for line in shown.stdout.splitlines()), shown.stdout
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
        assert again.returncode == 0, again.stderr
        assert again.stdout == first.stdout  # her earlier result: she counts once
        turned = await cli(settings, "reject", approval_id, "--reason", "no",
                           COHORTFLOW_LOCAL_IDENTITY="alice")  # fmt: skip
        assert turned.returncode == 2
        assert "alice has already approved" in turned.stderr
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


async def test_bulk_decisions_by_filter_each_through_its_campaign_and_resumable(
    api_url: str, settings: Settings, dev_harness: Harness
) -> None:
    db = dev_harness.db
    recencies = [5.0, 40.0, 90.0, 150.0, 200.0, 300.0]
    async with dev_harness.workers():
        document = two_approvers(required=1)
        spec, version = await dev_harness.apply(document)
        handles = [
            await dev_harness.launch(spec, version, await dev_harness.customer(recency_days=r))
            for r in recencies
        ]
        for handle in handles:
            await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        async with db.transaction() as session:
            pending = await approvals.list_approvals(session, campaign_id=spec.campaign_id)
        churn = sorted(float(a.scores["churn"]) for a in pending)
        threshold = churn[len(churn) // 2]
        high = {a.approval_id for a in pending if float(a.scores["churn"]) >= threshold}
        assert 0 < len(high) < len(pending)

        body = {"decision": "approve", "reason": "batch review", "campaign_id": spec.campaign_id}
        alice = bearer(await issue_token(db, "alice", "approver"))
        applier = bearer(await issue_token(db, "tests", "approver"))
        async with httpx.AsyncClient(base_url=api_url, timeout=120) as http:
            bad = await http.post(
                "/v1/approvals/decisions", json={**body, "min_score": 0.5}, headers=alice
            )
            assert bad.status_code == 422
            assert bad.json()["detail"][0]["loc"] == ["body", "score"]
            own = await http.post("/v1/approvals/decisions", json=body, headers=applier)
            assert own.json()["refused"] == len(pending)
            assert own.json()["decided"] == 0
            chosen = {**body, "score": "churn", "min_score": threshold}
            first = await http.post("/v1/approvals/decisions", json=chosen, headers=alice)
            assert first.status_code == 200, first.text
            assert first.json() == {
                "matched": len(high),
                "decided": len(high),
                "refused": 0,
                "already_decided": 0,
                "refusals": {},
            }
            again = await http.post("/v1/approvals/decisions", json=chosen, headers=alice)
            assert again.json()["matched"] == 0  # resumable: nothing is decided twice

        rest = await cli(
            settings, "approvals", "decide", "reject", "--campaign", spec.campaign_id,
            "--reason", "not this quarter", "--yes", COHORTFLOW_LOCAL_IDENTITY="bob",
        )  # fmt: skip
        assert rest.returncode == 0, rest.stderr
        low = len(pending) - len(high)
        assert rest.stdout.splitlines()[0] == (
            f"matched {low}: {low} rejected, 0 refused by validation, 0 already decided"
        )
        results = [await dev_harness.result(h) for h in handles]
    assert sorted(r.state for r in results).count(CampaignState.REJECTED) == low
    async with db.transaction() as session:
        decided = await session.scalar(
            select(func.count())
            .select_from(AuditRow)
            .where(AuditRow.campaign_id == spec.campaign_id, AuditRow.kind == "approval_decided")
        )
        rows = await approvals.list_approvals(session, None, spec.campaign_id)
    assert decided == len(pending)  # one audit row per request
    assert {r.approval_id for r in rows if r.status == "approved"} == high
    assert {r.decided_by for r in rows} == {"alice", "bob"}
