"""Inputs that reached a 500 or were taken when they should not be (issue 15, and what the
fuzzer in test_api_fuzz.py found), over a real socket on SQLite and PostgreSQL: each is
refused naming its field, the answer encodes, and nothing is written.

The events-side cases (a lone surrogate in an event, nesting ~930 deep, 10^400 and 1e308)
are in test_segment_ingest.py; gzip on Segment's batch route too.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cohortflow.storage import campaigns, customers
from cohortflow.storage.db import Database
from cohortflow.storage.tables import (
    ApiToken,
    AuditRow,
    Campaign,
    Cohort,
    Consent,
    ConsentChange,
    Event,
)
from tests.harness import bearer, issue_token, spec_document
from tests.test_events import PSEUDONYMISER, Served, serve_api, settings_for, track

SURROGATE = "\ud800"
WRITTEN = (ApiToken, AuditRow, Campaign, Cohort, Consent, ConsentChange, Event)


@pytest.fixture
async def api(db: Database, database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """The API over the test database, with a customer and a campaign in it."""
    key = PSEUDONYMISER.customer_key("known")
    async with db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(key, "known", "k@example.com")]
        )
        await campaigns.save_spec_version(
            session, "held", spec_document(campaign_id="held"), created_by="tests"
        )
    async with serve_api(settings_for(database_url, tmp_path)) as served:
        yield served


async def counts(db: Database) -> dict[str, int]:
    """Rows in every table a request of these routes may write."""
    async with db.transaction() as session:
        return {
            t.__tablename__: int(await session.scalar(select(func.count()).select_from(t)) or 0)
            for t in WRITTEN
        }


def raw_json(document: dict[str, Any]) -> bytes:
    """``document`` as JSON bytes, a lone surrogate kept as its escape (as a client sends)."""
    return json.dumps(document).encode()


def strings(value: Any) -> list[str]:
    """Every key and string value of a JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def assert_encodable(response: httpx.Response) -> Any:
    """The answer is UTF-8 JSON with no lone surrogate in any string; returns it."""
    document = json.loads(response.content.decode("utf-8"))
    for text in strings(document):
        text.encode("utf-8")
    return document


CONSENT = {"customer_id": "known", "channel": "email", "purpose": "marketing", "granted": True}


SURROGATE_BODIES = [
    ("/v1/consent", {**CONSENT, "customer_id": SURROGATE}, "customer_id"),
    ("/v1/consent", {**CONSENT, "text": "I agree" + SURROGATE}, "text"),
    ("/v1/approvals/a1/decision", {"decision": "approve", "reason": SURROGATE}, "reason"),
    ("/v1/approvals/decisions", {"decision": SURROGATE, "reason": "r"}, "decision"),
    ("/v1/campaigns/held/pause", {"reason": SURROGATE}, "reason"),
    ("/v1/campaigns/held/cancel", {"reason": "x" + SURROGATE}, "reason"),
    ("/v1/tokens", {"name": SURROGATE, "roles": ["operator"]}, "name"),
    ("/v1/cohorts", {"cohort_id": SURROGATE, "name": "n", "rule": {}}, "cohort_id"),
]


async def test_a_lone_surrogate_in_a_body_is_a_422_naming_its_field(
    api: Served, db: Database
) -> None:
    admin = await issue_token(db, "admin", "admin", "approver", "operator")
    before = await counts(db)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=bearer(admin)) as http:
        for path, body, field in SURROGATE_BODIES:
            response = await http.post(
                path, content=raw_json(body), headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, (path, response.text)
            detail = assert_encodable(response)["detail"]
            assert ["body", field] in [d["loc"] for d in detail], (path, detail)
    assert await counts(db) == before


async def test_a_body_that_is_not_utf8_is_a_422_at_the_body(api: Served, db: Database) -> None:
    admin = await issue_token(db, "admin", "admin")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await http.post(
            "/v1/consent",
            content=b'{"customer_id": "\xff"}',
            headers={**bearer(admin), "content-type": "application/json"},
        )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


async def test_a_batch_whose_second_event_has_a_lone_surrogate_keeps_the_first(
    api: Served, db: Database
) -> None:
    body = {"batch": [track("first", "u"), track(SURROGATE, "u")]}
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=api.headers) as http:
        response = await http.post(
            "/v1/events", content=raw_json(body), headers={"content-type": "application/json"}
        )
    assert response.status_code == 200, response.text
    results = assert_encodable(response)["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected"]
    assert results[1]["messageId"] is None
    assert results[1]["errors"][0]["loc"] == ["body", "batch", 1, "messageId"]
    async with db.transaction() as session:
        assert list(await session.scalars(select(Event.message_id))) == ["first"]


async def test_bodies_not_declared_json_are_415_and_not_read(api: Served, db: Database) -> None:
    # What a web page can send across origins without a preflight, browser credentials with.
    kinds = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
    event = track("m", "u")
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=api.headers) as http:
        for path in ("/v1/events", "/v1/batch", "/v1/track"):
            body = json.dumps({"batch": [event]} if path != "/v1/track" else event).encode()
            for content_type in [*kinds, None]:
                headers = {"content-type": content_type} if content_type else {}
                response = await http.post(path, content=body, headers=headers)
                assert response.status_code == 415, (path, content_type, response.text)
                assert response.json()["detail"][0]["loc"] == ["header", "content-type"]
    assert (await counts(db))["events"] == 0


async def test_gzip_bodies_to_our_events_route_are_read(api: Served, db: Database) -> None:
    packed = gzip.compress(json.dumps({"batch": [track("zipped", "u")]}).encode())
    headers = {"content-type": "application/json; charset=utf-8", "content-encoding": "gzip"}
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=api.headers) as http:
        response = await http.post("/v1/events", content=packed, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 1


@pytest.mark.parametrize(
    ("timestamp", "sent_at"),
    [
        ("0020-06-15T09:04:04Z", "2894-05-19T19:20:03+10:10"),  # centuries apart
        ("0001-01-01T00:00:00+15:00", None),  # before year 1 in UTC
    ],
)
async def test_a_clock_correction_out_of_any_calendar_is_refused_by_path(
    api: Served, db: Database, timestamp: str, sent_at: str | None
) -> None:
    # Found by the fuzzer: the correction overflowed datetime and answered 500.
    event = {**track("odd", "u"), "timestamp": timestamp, "sentAt": sent_at}
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=api.headers) as http:
        response = await http.post("/v1/events", json={"batch": [event]})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "batch", 0, "timestamp"]
    assert (await counts(db))["events"] == 0


async def test_the_document_describes_the_bodies_routes_read_themselves(api: Served) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        document = (await http.get("/openapi.json")).json()
    components = document["components"]["schemas"]

    def body(path: str) -> dict[str, Any]:
        schema: dict[str, Any] = document["paths"][path]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"]
        return schema

    batch = body("/v1/events")
    assert batch["required"] == ["batch"]
    refs = {item["$ref"] for item in batch["properties"]["batch"]["items"]["oneOf"]}
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(components)
    assert body("/v1/track")["properties"]["type"]["const"] == "track"
    assert "type" not in body("/v1/track")["required"]  # the path says it
    assert body("/v1/cohorts")["additionalProperties"] is False
    assert "rule" in body("/v1/cohorts")["required"]
    for path in ("/v1/events", "/v1/batch", "/v1/alias"):
        assert "415" in document["paths"][path]["post"]["responses"]
