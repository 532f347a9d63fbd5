"""A CRM answering garbage, through the real ``crm_write`` activity and a worker's CRM path
over real HTTP: every answer a failed attempt the workflow retries (never a write taken for
done), and nothing on record: no ledger effect, no ``crm_written`` row. The connector-level
property (any answer is a CrmError or outcomes) is tests/test_crm_hubspot_garbage.py."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import func, select
from temporalio.exceptions import ApplicationError

from activities.campaign.crm import CrmActivities
from cohortflow.storage.db import Database
from cohortflow.storage.tables import AuditRow, CrmEffect
from tests.harness import consenting_customer, crm_env, crm_path, serve_app
from workflows.campaign.activity_io import CrmWriteInput

JSON = "application/json"
GARBAGE = [
    pytest.param(200, "not json at all", "text/plain", id="200-text"),
    pytest.param(200, "[]", JSON, id="200-list"),
    pytest.param(200, '{"results": "everything"}', JSON, id="200-results-string"),
    pytest.param(200, '{"results": [{"id": null, "properties": 7}]}', JSON, id="200-bad-rows"),
    pytest.param(207, '{"errors": [{"context": {"id": ["?"]}}]}', JSON, id="207-odd-error"),
    pytest.param(201, '{"status": "COMPLETE"}', JSON, id="201-no-results"),
    pytest.param(500, "<html>oops</html>", "text/html", id="500-html"),
]


def garbage_crm(status: int, body: str, media_type: str) -> FastAPI:
    """A CRM that answers every request with the same garbage."""
    app = FastAPI(title="garbage CRM")

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def answer(path: str, request: Request) -> Response:
        await request.body()
        return Response(body, status_code=status, media_type=media_type)

    return app


@pytest.mark.parametrize(("status", "body", "media_type"), GARBAGE)
@pytest.mark.parametrize("action", ["set_properties", "enroll_sequence"])
async def test_garbage_is_a_retried_attempt_and_nothing_is_recorded(
    db: Database, status: int, body: str, media_type: str, action: str
) -> None:
    key = await consenting_customer(db)
    fields: dict[str, Any] = (
        {"properties": {"tier": "gold"}} if action == "set_properties" else {"sequence_id": "s"}
    )
    write = CrmWriteInput(
        workflow_id=f"campaign:garbage:{key}:1", step_id="label", campaign_id="garbage",
        customer_key=key, action=action, channel="email", purpose="marketing", **fields,
    )  # fmt: skip
    settings = {
        "crm_kind": "hubspot",
        "crm_token": "pat-garbage",
        "crm_user_id": "7",
        "crm_sender_email": "rep@example.com",
    }
    with serve_app(garbage_crm(status, body, media_type)) as url:
        batcher = crm_path(db, url, **settings)
        crm = CrmActivities(db, batcher, owned_properties=["*"], sender_email="rep@example.com")
        try:
            with pytest.raises(Exception) as failed:
                await crm_env().run(crm.crm_write, write)
        finally:
            await batcher.aclose()
    # A failed attempt, retried by the workflow's policy: never a business refusal that
    # would send the customer to the safe segment on a CRM's say-so it did not give.
    error = failed.value
    assert not (isinstance(error, ApplicationError) and error.non_retryable), error
    async with db.transaction() as session:
        effects = await session.scalar(
            select(func.count()).select_from(CrmEffect).where(CrmEffect.customer_key == key)
        )
        written = await session.scalar(
            select(func.count())
            .select_from(AuditRow)
            .where(AuditRow.customer_key == key, AuditRow.kind == "crm_written")
        )
    assert (effects, written) == (0, 0)
