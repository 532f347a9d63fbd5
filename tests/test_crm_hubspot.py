"""HubSpotConnector against the sandbox CRM in ``hubspot`` mode, over real HTTP, on both path
styles: every operation, per-record refusals, 429 in each of HubSpot's forms, replies lost
after the write, the bearer token, the daily limit."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from cohortflow.crm.connector import (
    ContactWrite,
    CrmRejected,
    CrmRetryAfter,
    CrmUnavailable,
    CrmWaitForWindow,
    Membership,
)
from cohortflow.crm.factory import make_connector
from cohortflow.crm.hubspot import HubSpotConnector
from cohortflow.crm.sandbox import SandboxConfig, create_app
from cohortflow.runtime.ports import free_port
from tests.harness import serve_app

TOKEN = "pat-na1-sandbox"
SENDER = "rep@example.com"
USER = "2222222"
PATH_STYLES = ["2026-03", "legacy"]
UNENROLL = {
    "2026-03": "/automation/sequences/2026-03/enrollments/unenroll",
    "legacy": "/automation/v4/sequences/enrollments/unenroll",
}
# A path each style uses and the other does not.
UPSERT_ROUTE = {
    "2026-03": "/crm/objects/{version}/contacts/batch/upsert",
    "legacy": "/crm/v3/objects/contacts/batch/upsert",
}


@contextlib.contextmanager
def hubspot_sandbox(db_path: Path, **config: Any) -> Iterator[str]:
    settings: dict[str, Any] = {"mode": "hubspot", "token": TOKEN, "rate_limit": 10_000}
    settings.update(config)
    with serve_app(create_app(SandboxConfig(db_path=db_path, **settings))) as url:
        yield url


def connector(url: str, paths: str = "2026-03", **options: Any) -> HubSpotConnector:
    token = options.pop("token", TOKEN)
    settings: dict[str, Any] = {
        "paths": paths,
        "sender_email": SENDER,
        "user_id": USER,
        "sequence_unenroll_path": UNENROLL[paths],
        "timeout": 5.0,
    }
    settings.update(options)
    return HubSpotConnector(url, token, **settings)


def key() -> str:
    return uuid.uuid4().hex


async def sandbox_get(url: str, path: str, **params: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as raw:
        response = await raw.get(path, params=params)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def inject(url: str, **fault: Any) -> None:
    async with httpx.AsyncClient(base_url=url) as raw:
        (await raw.post("/_sandbox/faults", json=fault)).raise_for_status()


async def enrolments(url: str, contact_key: str) -> dict[str, int]:
    """Applied enrolments of one contact per sequence, from the sandbox's effect rows."""
    effects = await sandbox_get(url, "/_sandbox/effects")
    return {
        row["sequence_id"]: row["count"]
        for row in effects["enrollments"]
        if row["keys"].get("cohortflow_key") == contact_key
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with hubspot_sandbox(tmp_path_factory.mktemp("hubspot") / "crm.db") as url:
        yield url


@pytest.fixture(params=PATH_STYLES)
async def hubspot(request: pytest.FixtureRequest, shared: str) -> AsyncIterator[HubSpotConnector]:
    async with connector(shared, request.param) as crm:
        yield crm
    async with httpx.AsyncClient(base_url=shared) as raw:
        (await raw.delete("/_sandbox/faults")).raise_for_status()


async def test_every_operation_on_both_path_styles(hubspot: HubSpotConnector, shared: str) -> None:
    a, b = key(), key()
    before = await sandbox_get(shared, "/_sandbox/stats")

    written = await hubspot.upsert_contacts(
        [
            ContactWrite(f"w1-{a}", a, {"cohort_label": "lapsing", "tier": "gold"}),
            ContactWrite(f"w1-{b}", b, {"cohort_label": "new"}),
            ContactWrite(f"w2-{a}", a, {"tier": "platinum"}),  # same contact: a second call
        ]
    )
    enrolled = await hubspot.enroll(Membership(f"e-{a}", a, "winback_email"))
    listed = await hubspot.add_to_list(
        "101", [Membership(f"l-{a}", a, "101"), Membership(f"l-{b}", b, "101")]
    )
    again = await hubspot.add_to_list("101", [Membership(f"l2-{a}", a, "101")])
    state = await hubspot.read_contact(a)

    assert [(o.key, o.ok, o.note) for o in written] == [
        (f"w1-{a}", True, "created"),
        (f"w1-{b}", True, "created"),
        (f"w2-{a}", True, ""),
    ]
    assert written[0].crm_id == written[2].crm_id != written[1].crm_id
    assert enrolled.ok and enrolled.crm_id == written[0].crm_id
    assert [o.ok for o in listed] == [True, True] and again[0].note == "already a member"
    assert state is not None
    assert state.crm_id == written[0].crm_id
    assert state.properties["tier"] == "platinum"
    assert state.properties["cohort_label"] == "lapsing"
    assert state.properties["cohortflow_key"] == a
    assert (state.sequences, state.lists) == (["winback_email"], ["101"])

    removed = await hubspot.remove_from_list("101", [Membership(f"r-{a}", a, "101")])
    unenrolled = await hubspot.unenroll(Membership(f"u-{a}", a, "winback_email"))
    unenrolled_again = await hubspot.unenroll(Membership(f"u-{a}", a, "winback_email"))
    not_member = await hubspot.remove_from_list("101", [Membership(f"r-{a}", a, "101")])
    after = await hubspot.read_contact(a)

    assert removed[0].ok and unenrolled.ok
    assert unenrolled_again.ok and unenrolled_again.note == "not enrolled in it"
    assert not_member[0].ok and not_member[0].note == "was not a member"
    assert after is not None and (after.sequences, after.lists) == ([], [])
    assert await hubspot.read_contact(key()) is None
    stats = await sandbox_get(shared, "/_sandbox/stats")
    used = {
        (r["route"], r["status"])
        for r in stats["requests"]
        if r["count"] > _count(before, r["method"], r["route"], r["status"])
    }
    paths = "legacy" if hubspot.paths.upsert.startswith("/crm/v3/") else "2026-03"
    other = "2026-03" if paths == "legacy" else "legacy"
    assert (UPSERT_ROUTE[paths], 200) in used
    assert not any(route == UPSERT_ROUTE[other] for route, _ in used)
    assert all(status in (200, 207, 404) for _, status in used)


def _count(stats: dict[str, Any], method: str, route: str, status: int) -> int:
    return sum(
        r["count"]
        for r in stats["requests"]
        if (r["method"], r["route"], r["status"]) == (method, route, status)
    )


async def test_a_fresh_connector_finds_contacts_by_the_id_property(shared: str) -> None:
    a = key()
    async with connector(shared) as first:
        [created] = await first.upsert_contacts([ContactWrite(f"w-{a}", a, {"tier": "gold"})])
    async with connector(shared, "legacy") as second:  # no cached id: a batch read finds it
        enrolled = await second.enroll(Membership(f"e-{a}", a, "nurture"))
        listed = await second.add_to_list("7", [Membership(f"l-{a}", a, "7")])

    assert enrolled.ok and enrolled.crm_id == created.crm_id
    assert listed[0].ok and listed[0].crm_id == created.crm_id


async def test_one_refused_record_fails_only_itself(hubspot: HubSpotConnector, shared: str) -> None:
    a, b, c = key(), key(), key()
    await inject(shared, kind="reject_record", record_id=b, status=400, message="bad email")

    outcomes = await hubspot.upsert_contacts(
        [ContactWrite(f"w-{k}", k, {"email": f"{k}@example.com"}) for k in (a, b, c)]
    )

    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].retryable is False
    assert "bad email" in outcomes[1].error
    assert await hubspot.read_contact(b) is None
    stored = await sandbox_get(shared, "/_sandbox/contacts", id_property="cohortflow_key", value=c)
    assert stored["contacts"][0]["properties"]["email"] == f"{c}@example.com"


async def test_contacts_the_crm_lacks(hubspot: HubSpotConnector) -> None:
    ghost = key()

    enrolled = await hubspot.enroll(Membership(f"e-{ghost}", ghost, "s"))
    listed = await hubspot.add_to_list("9", [Membership(f"l-{ghost}", ghost, "9")])
    removed = await hubspot.remove_from_list("9", [Membership(f"r-{ghost}", ghost, "9")])
    unenrolled = await hubspot.unenroll(Membership(f"u-{ghost}", ghost, "s"))

    assert not enrolled.ok and not enrolled.retryable and "no contact" in enrolled.error
    assert not listed[0].ok and "no contact" in listed[0].error
    assert removed[0].ok and unenrolled.ok


@pytest.mark.parametrize(("policy", "longest"), [("TEN_SECONDLY_ROLLING", 10.0), ("SECONDLY", 1.0)])
async def test_a_short_window_429_without_retry_after_waits_out_the_window(
    hubspot: HubSpotConnector, shared: str, policy: str, longest: float
) -> None:
    await inject(shared, status=429, policy=policy, path_prefix="/crm/")
    async with httpx.AsyncClient(
        base_url=shared, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as raw:
        answer = await raw.get("/crm/objects/2026-03/contacts/x", params={"idProperty": "k"})
    assert answer.status_code == 429
    assert "retry-after" not in answer.headers
    assert answer.json()["policyName"] == policy
    assert answer.headers["X-HubSpot-RateLimit-Remaining"] == "0"

    await inject(shared, status=429, policy=policy, path_prefix="/crm/")
    with pytest.raises(CrmRetryAfter) as caught:
        await hubspot.upsert_contacts([ContactWrite("w", key(), {})])

    assert 0 < caught.value.seconds <= longest
    assert policy in str(caught.value)


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Auckland"])
async def test_the_daily_policy_waits_for_midnight_in_the_accounts_zone(
    shared: str, zone: str
) -> None:
    now = datetime(2026, 6, 30, 23, 30, tzinfo=UTC)
    async with connector(shared, daily_reset_timezone=zone, clock=lambda: now) as crm:
        await inject(shared, status=429, policy="DAILY")
        with pytest.raises(CrmWaitForWindow) as caught:
            await crm.upsert_contacts([ContactWrite("w", key(), {})])

    local = now.astimezone(ZoneInfo(zone))
    midnight = datetime.combine(
        local.date() + timedelta(days=1), datetime.min.time(), ZoneInfo(zone)
    )
    assert caught.value.policy == "DAILY"
    assert caught.value.until == midnight
    assert caught.value.until.tzinfo is UTC
    assert caught.value.until > now


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("Wed, 21 Oct 2099 07:28:00 GMT", 60.0)],
)
async def test_retry_after_in_either_form_wins(shared: str, header: str, seconds: float) -> None:
    now = datetime(2099, 10, 21, 7, 27, tzinfo=UTC)
    async with connector(shared, clock=lambda: now) as crm:
        await inject(shared, status=429, retry_after_header=header, policy="DAILY")
        with pytest.raises(CrmRetryAfter) as caught:
            await crm.upsert_contacts([ContactWrite("w", key(), {})])

    assert caught.value.seconds == seconds


async def test_a_reply_lost_after_the_write_is_ambiguous_and_reads_back(
    hubspot: HubSpotConnector, shared: str
) -> None:
    a = key()
    await hubspot.upsert_contacts([ContactWrite(f"w-{a}", a, {"tier": "gold"})])
    await inject(shared, kind="drop", path_prefix="/automation/sequences/")
    await inject(shared, kind="drop", path_prefix="/automation/v4/")

    with pytest.raises(CrmUnavailable) as lost:
        await hubspot.enroll(Membership(f"e-{a}", a, "winback_email"))
    state = await hubspot.read_contact(a)

    assert lost.value.ambiguous is True and lost.value.status is None
    assert state is not None and state.sequences == ["winback_email"]
    assert await enrolments(shared, a) == {"winback_email": 1}
    stats = await sandbox_get(shared, "/_sandbox/stats")
    assert stats["dropped"] >= 1

    await inject(shared, kind="drop", path_prefix="/crm/")
    with pytest.raises(CrmUnavailable) as lost_upsert:
        await hubspot.upsert_contacts([ContactWrite(f"w2-{a}", a, {"tier": "platinum"})])
    after = await hubspot.read_contact(a)
    assert lost_upsert.value.ambiguous is True
    assert after is not None and after.properties["tier"] == "platinum"


async def test_a_timeout_after_sending_is_ambiguous(shared: str) -> None:
    a = key()
    async with connector(shared, timeout=0.3) as impatient:
        await inject(shared, kind="latency", seconds=1.0)
        with pytest.raises(CrmUnavailable) as caught:
            await impatient.upsert_contacts([ContactWrite(f"w-{a}", a, {"tier": "gold"})])
    await asyncio.sleep(1.0)
    async with connector(shared) as crm:  # another process: it names what it checks
        state = await crm.read_contact(a, ["tier"])

    assert caught.value.ambiguous is True
    assert state is not None and state.properties["tier"] == "gold"


async def test_server_errors_and_no_server(shared: str) -> None:
    async with connector(shared) as crm:
        await inject(shared, status=503)
        with pytest.raises(CrmUnavailable) as refused:
            await crm.upsert_contacts([ContactWrite("w", key(), {})])
        await inject(shared, status=500)
        with pytest.raises(CrmUnavailable) as failed:
            await crm.upsert_contacts([ContactWrite("w", key(), {})])
    async with connector(f"http://127.0.0.1:{free_port()}", timeout=1.0) as nowhere:
        with pytest.raises(CrmUnavailable) as unreachable:
            await nowhere.upsert_contacts([ContactWrite("w", key(), {})])

    assert (refused.value.status, refused.value.ambiguous) == (503, False)
    assert (failed.value.status, failed.value.ambiguous) == (500, True)
    assert (unreachable.value.status, unreachable.value.ambiguous) == (None, False)


async def test_the_bearer_token_is_required(shared: str) -> None:
    for token in (None, "wrong"):
        crm = HubSpotConnector(shared, token, sender_email=SENDER, user_id=USER)
        async with crm:
            with pytest.raises(CrmRejected) as caught:
                await crm.upsert_contacts([ContactWrite("w", key(), {})])
            enrol = crm.enroll(Membership("e", key(), "s"))
            with pytest.raises(CrmRejected):
                await enrol  # the contact lookup is refused too: not one record's fault
        assert caught.value.status == 401
    stats = await sandbox_get(shared, "/_sandbox/stats")
    assert stats["by_status"]["401"] >= 4


async def test_enrolments_are_not_idempotent_in_hubspot_mode(
    hubspot: HubSpotConnector, shared: str
) -> None:
    a = key()
    await hubspot.upsert_contacts([ContactWrite(f"w-{a}", a, {})])

    first = await hubspot.enroll(Membership(f"e-{a}", a, "winback_email"))
    second = await hubspot.enroll(Membership(f"e-{a}", a, "winback_email"))

    assert first.ok and second.ok and first.note != second.note
    assert await enrolments(shared, a) == {"winback_email": 2}
    effects = await sandbox_get(shared, "/_sandbox/effects")
    assert effects["duplicate_enrollments"] >= 1


@pytest.mark.parametrize("paths", PATH_STYLES)
async def test_already_enrolled_is_ok_for_the_same_sequence_only(
    tmp_path: Path, paths: str
) -> None:
    a = key()
    with hubspot_sandbox(tmp_path / "crm.db", already_enrolled="reject") as url:
        async with connector(url, paths) as crm:
            await crm.upsert_contacts([ContactWrite(f"w-{a}", a, {})])
            first = await crm.enroll(Membership(f"e1-{a}", a, "winback_email"))
            same = await crm.enroll(Membership(f"e2-{a}", a, "winback_email"))
            other = await crm.enroll(Membership(f"e3-{a}", a, "nurture"))
        counted = await enrolments(url, a)

    assert first.ok
    assert same.ok and "already enrolled" in same.note
    assert not other.ok and not other.retryable
    assert "ALREADY_ENROLLED in sequence winback_email" in other.error
    assert counted == {"winback_email": 1}


async def test_unenrolling_without_an_endpoint_refuses_only_what_it_cannot_do(
    shared: str,
) -> None:
    a = key()
    async with connector(shared, sequence_unenroll_path=None) as crm:
        await crm.upsert_contacts([ContactWrite(f"w-{a}", a, {})])
        not_in = await crm.unenroll(Membership(f"u-{a}", a, "winback_email"))
        await crm.enroll(Membership(f"e-{a}", a, "winback_email"))
        stuck = await crm.unenroll(Membership(f"u-{a}", a, "winback_email"))

    assert not_in.ok
    assert not stuck.ok and not stuck.retryable
    assert "no unenrolment endpoint" in stuck.error


async def test_enrolment_needs_a_sender_and_a_user(shared: str) -> None:
    a = key()
    async with connector(shared, sender_email="", user_id="") as crm:
        await crm.upsert_contacts([ContactWrite(f"w-{a}", a, {})])
        no_sender = await crm.enroll(Membership(f"e-{a}", a, "s"))
        no_user = await crm.enroll(Membership(f"e-{a}", a, "s", sender_email=SENDER))

    assert not no_sender.ok and "sender" in no_sender.error
    assert not no_user.ok and "userId" in no_user.error
    assert await enrolments(shared, a) == {}


async def test_the_rolling_limit_answers_hubspots_429_and_its_wait_is_enough(
    tmp_path: Path,
) -> None:
    with hubspot_sandbox(tmp_path / "crm.db", rate_limit=3, window_seconds=2.0) as url:
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as raw:
            answers = [await raw.get("/crm/v3/objects/contacts/x") for _ in range(4)]
        await asyncio.sleep(2.0)
        async with connector(url) as crm:
            for _ in range(3):
                await crm.read_contact(key())
            with pytest.raises(CrmRetryAfter) as caught:
                await crm.upsert_contacts([ContactWrite("w", key(), {})])
            assert 0 < caught.value.seconds <= 2.0
            await asyncio.sleep(caught.value.seconds)
            [outcome] = await crm.upsert_contacts([ContactWrite("w", key(), {})])
        stats = await sandbox_get(url, "/_sandbox/stats")

    first, limited = answers[0], answers[-1]
    assert first.status_code == 404  # admitted: no such contact
    assert first.headers["X-HubSpot-RateLimit-Max"] == "3"
    assert first.headers["X-HubSpot-RateLimit-Remaining"] == "2"
    assert first.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "2000"
    assert limited.status_code == 429 and "retry-after" not in limited.headers
    assert limited.json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert outcome.ok, "the wait the connector chose was enough"
    assert stats["rate_limited"] == 2


async def test_the_daily_limit_is_a_window_to_wait_for(tmp_path: Path) -> None:
    zone = "America/New_York"
    with hubspot_sandbox(tmp_path / "crm.db", daily_limit=2, daily_reset_timezone=zone) as url:
        async with connector(url, daily_reset_timezone=zone) as crm:
            a = key()
            await crm.upsert_contacts([ContactWrite(f"w-{a}", a, {})])
            await crm.upsert_contacts([ContactWrite(f"w2-{a}", a, {"x": "1"})])
            with pytest.raises(CrmWaitForWindow) as caught:
                await crm.upsert_contacts([ContactWrite(f"w3-{a}", a, {"x": "2"})])
        async with httpx.AsyncClient(base_url=url) as raw:
            spent = await raw.get(
                "/crm/v3/objects/contacts/x", headers={"Authorization": f"Bearer {TOKEN}"}
            )

    now = datetime.now(UTC).astimezone(ZoneInfo(zone))
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), ZoneInfo(zone))
    assert caught.value.policy == "DAILY"
    assert abs((caught.value.until - midnight).total_seconds()) < 1
    assert spent.status_code == 429 and "retry-after" not in spent.headers
    assert spent.json()["policyName"] == "DAILY"
    assert spent.headers["X-HubSpot-RateLimit-Daily"] == "2"
    assert spent.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "0"


async def test_the_factory_builds_either_kind(shared: str) -> None:
    hub = make_connector(
        "hubspot", shared, TOKEN, 5.0, paths="legacy", user_id=USER, sender_email=SENDER
    )
    own = make_connector("sandbox", "http://127.0.0.1:1", None, 5.0, paths="legacy")
    try:
        assert (hub.kind, hub.max_batch, own.kind, own.max_batch) == (
            "hubspot",
            100,
            "sandbox",
            100,
        )
        a = key()
        [written] = await hub.upsert_contacts([ContactWrite(f"w-{a}", a, {"tier": "gold"})])
        assert written.ok
    finally:
        await hub.aclose()
        await own.aclose()
    with pytest.raises(ValueError, match="unknown CRM kind"):
        make_connector("salesforce", shared, None, 5.0)


async def test_batches_out_of_range_are_refused_before_sending(hubspot: HubSpotConnector) -> None:
    with pytest.raises(ValueError, match="1 to 100"):
        await hubspot.upsert_contacts([])
    with pytest.raises(ValueError, match="1 to 100"):
        await hubspot.add_to_list("1", [Membership(str(i), str(i), "1") for i in range(101)])
