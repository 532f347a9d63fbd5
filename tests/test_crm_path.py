"""The campaign's CRM write path against the sandbox in HubSpot mode, over real HTTP: the gate,
batching across campaigns, the shared ceiling, the ledger and read-backs, attribute ownership
and compensation, run through the real ``crm_write``/``crm_compensate`` activities on SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from temporalio.exceptions import ApplicationError

from activities.campaign.crm import CrmActivities
from cohortflow.crm.connector import ContactWrite, Membership
from cohortflow.crm.hubspot import HubSpotConnector
from cohortflow.storage import consent
from cohortflow.storage.db import Database
from cohortflow.storage.tables import AuditRow
from tests.harness import (
    HUBSPOT_TOKEN,
    consenting_customer,
    crm_env,
    crm_path,
    hubspot_sandbox,
    sandbox_view,
)
from workflows.campaign.activity_io import (
    CompensateInput,
    CrmOutcome,
    CrmWriteInput,
    Decision,
)

TOKEN = HUBSPOT_TOKEN
HUBSPOT: dict[str, Any] = {
    "crm_kind": "hubspot",
    "crm_token": TOKEN,
    "crm_user_id": "7",
    "crm_sender_email": "rep@example.com",
    "crm_sequence_unenroll_path": "/automation/sequences/2026-03/enrollments/unenroll",
}


@contextlib.asynccontextmanager
async def crm_activities(db: Database, url: str, **settings: Any) -> AsyncIterator[CrmActivities]:
    """The real CRM activities on ``db``, through a worker's CRM path to ``url``."""
    batcher = crm_path(db, url, **{**HUBSPOT, **settings})
    owned = settings.get("crm_owned_properties", ["*"])
    try:
        yield CrmActivities(db, batcher, owned_properties=owned, sender_email="rep@example.com")
    finally:
        await batcher.aclose()


def write(key: str, action: str = "set_properties", **fields: Any) -> CrmWriteInput:
    workflow_id = f"campaign:crmpath:{key}:1"
    return CrmWriteInput(
        workflow_id=workflow_id,
        step_id=fields.pop("step_id", "label"),
        campaign_id="crmpath",
        customer_key=key,
        action=action,
        channel="email",
        purpose="marketing",
        **fields,
    )


def fault(url: str, **body: Any) -> None:
    httpx.post(f"{url}/_sandbox/faults", json=body).raise_for_status()


async def crm_written(db: Database, workflow_id: str) -> list[dict[str, Any]]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(AuditRow.payload).where(
                AuditRow.workflow_id == workflow_id, AuditRow.kind == "crm_written"
            )
        )
        return [json.loads(p) for p in rows]


async def test_writes_of_many_campaigns_share_batch_calls_and_each_learns_its_own(
    db: Database, tmp_path: Path
) -> None:
    keys = [await consenting_customer(db) for _ in range(230)]
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        fault(url, kind="reject_record", record_id=keys[17], count=1)
        async with crm_activities(db, url, crm_batch_linger_ms=300) as crm:
            outcomes = await asyncio.gather(
                *(
                    crm_env().run(crm.crm_write, write(k, properties={"tier": "gold"}))
                    for k in keys
                ),
                return_exceptions=True,
            )
        stats = sandbox_view(url, "stats")
        contacts = sandbox_view(url, "contacts")["count"]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], ApplicationError)
    assert (refused[0].type, refused[0].non_retryable) == ("CrmRejected", True)
    assert outcomes.index(refused[0]) == 17
    assert sum(1 for o in outcomes if getattr(o, "outcome", None) == CrmOutcome.WRITTEN) == 229
    assert contacts == 229
    upserts = sum(r["count"] for r in stats["requests"] if r["route"].endswith("batch/upsert"))
    assert upserts <= 4, f"{upserts} upsert calls for 230 records"


async def test_a_lost_reply_after_an_enrolment_is_read_back_not_sent_again(
    db: Database, tmp_path: Path
) -> None:
    key = await consenting_customer(db)
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        async with crm_activities(db, url) as crm:
            await crm_env().run(crm.crm_write, write(key, properties={"tier": "gold"}))
            fault(url, kind="drop", path_prefix="/automation/", count=1)
            enrol = write(key, "enroll_sequence", step_id="enrol", sequence_id="winback")
            result = await crm_env().run(crm.crm_write, enrol)
            again = await crm_env(attempt=2).run(crm.crm_write, enrol)
        effects = sandbox_view(url, "effects")
    assert result.outcome == again.outcome == CrmOutcome.WRITTEN
    assert [e["count"] for e in effects["enrollments"]] == [1]
    assert effects["duplicate_enrollments"] == 0
    written = await crm_written(db, enrol.workflow_id)
    assert [w["confirmed"] for w in written if w["action"] == "enroll_sequence"] == ["read_back"]


async def test_a_written_action_records_what_it_carries_and_stays_written_on_retry(
    db: Database, tmp_path: Path
) -> None:
    # The lean campaign's last write carries its finish: on record with the write, and a
    # retry after the customer revoked consent still answers written (the action was made).
    key = await consenting_customer(db)
    finish = Decision("finish", "finished", {"state": "completed", "reason": "r"})
    last = write(key, step_id="label", properties={"tier": "gold"}, if_written=[finish])
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        async with crm_activities(db, url) as crm:
            first = await crm_env().run(crm.crm_write, last)
            async with db.transaction() as session:
                await consent.set_consent(session, key, "email", "marketing", False, "tests")
            again = await crm_env(attempt=2).run(crm.crm_write, last)
            refused = await crm_env().run(crm.crm_write, write(key, step_id="later"))
    assert (first.outcome, first.if_written_recorded) == (CrmOutcome.WRITTEN, True)
    assert again.outcome == CrmOutcome.WRITTEN
    assert refused.outcome == CrmOutcome.CONSENT_BLOCKED
    async with db.transaction() as session:
        rows = await session.execute(
            select(AuditRow.step_id, AuditRow.kind)
            .where(AuditRow.workflow_id == last.workflow_id)
            .order_by(AuditRow.seq)
        )
        chain = [(step, kind) for step, kind in rows]
    assert chain == [
        ("label", "consent_allowed"),
        ("label", "crm_written"),
        ("finish", "finished"),
        ("later", "consent_blocked"),
    ]


async def test_a_retried_enrolment_that_had_landed_is_read_back_first(
    db: Database, tmp_path: Path
) -> None:
    key = await consenting_customer(db)
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        # An earlier attempt enrolled the contact, then its worker died before recording it.
        async with HubSpotConnector(url, TOKEN, sender_email="r@example.com", user_id="7") as hs:
            await hs.upsert_contacts([ContactWrite("w", key, {"tier": "gold"})])
            assert (await hs.enroll(Membership("e", key, "winback"))).ok
        async with crm_activities(db, url) as crm:
            enrol = write(key, "enroll_sequence", step_id="enrol", sequence_id="winback")
            result = await crm_env(attempt=2).run(crm.crm_write, enrol)
        effects = sandbox_view(url, "effects")
    assert result.outcome == CrmOutcome.WRITTEN
    assert effects["duplicate_enrollments"] == 0


async def test_a_rate_limit_without_retry_after_is_waited_out_then_sent(
    db: Database, tmp_path: Path
) -> None:
    key = await consenting_customer(db)
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        fault(url, kind="status", status=429, policy="SECONDLY", count=1)
        async with crm_activities(db, url) as crm:
            result = await crm_env().run(crm.crm_write, write(key, properties={"tier": "gold"}))
        stats = sandbox_view(url, "stats")
    assert result.outcome == CrmOutcome.WRITTEN
    assert stats["rate_limited"] == 1


async def test_a_spent_daily_window_is_answered_with_when_it_resets(
    db: Database, tmp_path: Path
) -> None:
    first, second = await consenting_customer(db), await consenting_customer(db)
    with hubspot_sandbox(tmp_path / "hubspot.db", daily_limit=1) as url:
        async with crm_activities(db, url) as crm:
            done = await crm_env().run(crm.crm_write, write(first, properties={"a": "1"}))
            held = await crm_env().run(crm.crm_write, write(second, properties={"a": "1"}))
    assert done.outcome == CrmOutcome.WRITTEN
    assert held.outcome == CrmOutcome.WAIT_WINDOW
    midnight = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    assert datetime.fromisoformat(held.retry_at) == midnight


async def test_only_properties_cohortflow_owns_are_ever_written(
    db: Database, tmp_path: Path
) -> None:
    key = await consenting_customer(db)
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        async with crm_activities(db, url, crm_owned_properties=["cohort_*"]) as crm:
            with pytest.raises(ApplicationError) as refused:
                await crm_env().run(
                    crm.crm_write, write(key, properties={"cohort_label": "x", "lifecycle": "y"})
                )
            owned = await crm_env().run(crm.crm_write, write(key, properties={"cohort_a": "1"}))
        contacts = sandbox_view(url, "contacts")["contacts"]
    assert refused.value.non_retryable and "lifecycle" in str(refused.value)
    assert owned.outcome == CrmOutcome.WRITTEN
    assert [c["properties"].get("lifecycle") for c in contacts] == [None]


async def test_compensation_undoes_this_campaigns_effects_once(
    db: Database, tmp_path: Path
) -> None:
    key = await consenting_customer(db)
    steps = [
        write(key, properties={"cohort_label": "lapsing"}),
        write(key, "enroll_sequence", step_id="enrol", sequence_id="winback"),
        write(key, "add_to_list", step_id="listed", list_id="77"),
    ]
    undo = CompensateInput(
        steps[0].workflow_id, "crmpath", key, ["unenroll", "remove_from_lists", "clear_properties"]
    )
    with hubspot_sandbox(tmp_path / "hubspot.db") as url:
        async with crm_activities(db, url) as crm:
            for step in steps:
                assert (await crm_env().run(crm.crm_write, step)).outcome == CrmOutcome.WRITTEN
            undone = await crm_env().run(crm.crm_compensate, undo)
            requests = sandbox_view(url, "stats")["total"]
            again = await crm_env().run(crm.crm_compensate, undo)
            after = sandbox_view(url, "stats")["total"]
        async with HubSpotConnector(url, TOKEN) as hs:
            state = await hs.read_contact(key, ["cohort_label"])
    assert (undone.undone, undone.refused) == (3, 0)
    assert (again.undone, again.refused) == (3, 0) and after == requests  # from the ledger
    assert state is not None
    assert (state.sequences, state.lists, state.properties.get("cohort_label", "")) == ([], [], "")


async def test_two_processes_together_stay_under_the_crm_ceiling(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    keys = [await consenting_customer(db) for _ in range(24)]
    with hubspot_sandbox(tmp_path / "hubspot.db", rate_limit=8, window_seconds=1.0) as url:
        # The contacts exist first: enrolment needs them, and this test is about enrolments.
        async with HubSpotConnector(url, TOKEN) as hs:
            await hs.upsert_contacts([ContactWrite(f"w{k}", k, {}) for k in keys])
        await asyncio.sleep(1.5)  # that request, sent around the ceiling, leaves the window
        databases = [Database(database_url) for _ in range(2)]
        started = time.monotonic()
        try:
            # One request a call: enrolments cannot batch, so 24 calls at 8 a second.
            async with (
                crm_activities(
                    databases[0], url, crm_rate_limit=8, crm_rate_window_seconds=1
                ) as one,
                crm_activities(
                    databases[1], url, crm_rate_limit=8, crm_rate_window_seconds=1
                ) as two,
            ):
                results = await asyncio.gather(
                    *(
                        crm_env().run(
                            (one if i % 2 else two).crm_write,
                            write(k, "enroll_sequence", step_id="enrol", sequence_id="s"),
                        )
                        for i, k in enumerate(keys)
                    )
                )
        finally:
            for database in databases:
                await database.dispose()
        elapsed = time.monotonic() - started
        stats = sandbox_view(url, "stats")
    assert all(r.outcome == CrmOutcome.WRITTEN for r in results)
    assert stats["rate_limited"] == 0
    assert elapsed >= 2.0  # three windows' worth of requests
