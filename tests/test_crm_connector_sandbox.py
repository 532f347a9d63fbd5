"""SandboxConnector against the sandbox CRM's own mode over real HTTP, and the error mapping
both connectors share (Retry-After in both forms, transport failures by ambiguity)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cohortflow.crm._http import parse_retry_after, transport_error
from cohortflow.crm.client import _retry_after
from cohortflow.crm.connector import (
    ContactState,
    ContactWrite,
    CrmRetryAfter,
    CrmUnavailable,
    Membership,
)
from cohortflow.crm.sandbox import SandboxConfig, create_app
from cohortflow.crm.sandbox_connector import SandboxConnector
from cohortflow.runtime.ports import free_port
from tests.harness import serve_app


def key() -> str:
    return uuid.uuid4().hex


async def inject(url: str, **fault: Any) -> None:
    async with httpx.AsyncClient(base_url=url) as raw:
        (await raw.post("/_sandbox/faults", json=fault)).raise_for_status()


async def attempts(url: str, idempotency_key: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url) as raw:
        response = await raw.get("/_sandbox/requests", params={"idempotency_key": idempotency_key})
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["requests"]
    return found


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = SandboxConfig(db_path=tmp_path_factory.mktemp("own") / "crm.db", rate_limit=10_000)
    with serve_app(create_app(config)) as url:
        yield url


@pytest.fixture
async def sandbox(own: str) -> AsyncIterator[SandboxConnector]:
    async with SandboxConnector(own, token="any", timeout=5.0) as crm:
        yield crm
    async with httpx.AsyncClient(base_url=own) as raw:
        (await raw.delete("/_sandbox/faults")).raise_for_status()


async def test_every_operation(sandbox: SandboxConnector) -> None:
    a, b = key(), key()

    written = await sandbox.upsert_contacts(
        [
            ContactWrite(f"w1-{a}", a, {"tier": "gold"}),
            ContactWrite(f"w1-{b}", b, {"tier": "silver"}),
            ContactWrite(f"w2-{a}", a, {"tier": "platinum"}),  # same contact: next call
        ]
    )
    replayed = await sandbox.upsert_contacts([ContactWrite(f"w1-{b}", b, {"tier": "silver"})])
    enrolled = await sandbox.enroll(Membership(f"e-{a}", a, "winback_email"))
    enrolled_again = await sandbox.enroll(Membership(f"e-{a}", a, "winback_email"))
    listed = await sandbox.add_to_list(
        "vip", [Membership(f"l-{a}", a, "vip"), Membership(f"l-{b}", b, "vip")]
    )
    state = await sandbox.read_contact(a)

    assert [(o.ok, o.crm_id, o.note) for o in written] == [
        (True, a, "created"),
        (True, b, "created"),
        (True, a, ""),
    ]
    assert replayed[0].ok and replayed[0].note == "key replayed: written before"
    assert enrolled.ok and enrolled_again.ok and enrolled_again.note
    assert [o.ok for o in listed] == [True, True]
    assert state == ContactState(a, a, {"tier": "platinum"}, ["winback_email"], ["vip"])

    unenrolled = await sandbox.unenroll(Membership(f"u-{a}", a, "winback_email"))
    removed = await sandbox.remove_from_list("vip", [Membership(f"r-{a}", a, "vip")])
    removed_again = await sandbox.remove_from_list("vip", [Membership(f"r-{a}", a, "vip")])
    after = await sandbox.read_contact(a)

    assert unenrolled.ok and removed[0].ok
    assert removed_again[0].ok and removed_again[0].note == "was not a member"
    assert after is not None and (after.sequences, after.lists) == ([], [])
    assert await sandbox.read_contact(key()) is None


async def test_a_refused_record_fails_only_itself(sandbox: SandboxConnector, own: str) -> None:
    a, b, c = key(), key(), key()
    reused = f"k-{key()}"
    await sandbox.upsert_contacts([ContactWrite(reused, b, {"tier": "gold"})])

    outcomes = await sandbox.upsert_contacts(
        [
            ContactWrite(f"w-{a}", a, {"tier": "new"}),
            ContactWrite(reused, c, {"tier": "other body"}),  # a key used with another body
            ContactWrite(f"w-{b}", b, {"tier": "silver"}),
        ]
    )

    assert [o.ok for o in outcomes] == [True, False, True]
    assert "inputs[1].idempotency_key" in outcomes[1].error and not outcomes[1].retryable
    assert await sandbox.read_contact(c) is None
    state = await sandbox.read_contact(b)
    assert state is not None and state.properties == {"tier": "silver"}


async def test_memberships_of_an_unknown_contact_are_refused_per_record(
    sandbox: SandboxConnector,
) -> None:
    ghost = key()
    enrolled = await sandbox.enroll(Membership(f"e-{ghost}", ghost, "s"))
    listed = await sandbox.add_to_list("vip", [Membership(f"l-{ghost}", ghost, "vip")])
    unenrolled = await sandbox.unenroll(Membership(f"u-{ghost}", ghost, "s"))

    assert not enrolled.ok and enrolled.error.startswith("404")
    assert not listed[0].ok
    assert unenrolled.ok and unenrolled.note == "was not enrolled"


@pytest.mark.parametrize(
    ("header", "lower", "upper"),
    [("7", 7.0, 7.0), ("Wed, 21 Oct 2099 07:28:00 GMT", 2.2e9, 2.4e9)],
)
async def test_429_is_retry_after_in_either_form(
    sandbox: SandboxConnector, own: str, header: str, lower: float, upper: float
) -> None:
    await inject(own, status=429, retry_after_header=header)

    with pytest.raises(CrmRetryAfter) as caught:
        await sandbox.upsert_contacts([ContactWrite("w", key(), {})])

    assert lower <= caught.value.seconds <= upper


async def test_a_reply_dropped_after_the_write_is_ambiguous_and_replays_as_done(
    sandbox: SandboxConnector, own: str
) -> None:
    a = key()
    write = ContactWrite(f"w-{a}", a, {"tier": "gold"})
    await inject(own, kind="drop")

    with pytest.raises(CrmUnavailable) as lost:
        await sandbox.upsert_contacts([write])
    state = await sandbox.read_contact(a)
    [replayed] = await sandbox.upsert_contacts([write])

    assert lost.value.ambiguous is True
    assert state is not None and state.properties == {"tier": "gold"}
    assert replayed.ok and replayed.note == "key replayed: written before"
    logged = await attempts(own, write.key)
    assert [(r["status"], r["dropped"]) for r in logged] == [(200, True), (200, False)]


async def test_no_server_is_unavailable_and_not_ambiguous() -> None:
    async with SandboxConnector(f"http://127.0.0.1:{free_port()}", timeout=1.0) as nowhere:
        with pytest.raises(CrmUnavailable) as caught:
            await nowhere.upsert_contacts([ContactWrite("w", key(), {})])

    assert (caught.value.status, caught.value.ambiguous) == (None, False)


async def test_injected_503_is_unavailable_and_not_ambiguous(
    sandbox: SandboxConnector, own: str
) -> None:
    await inject(own, status=503)
    with pytest.raises(CrmUnavailable) as caught:
        await sandbox.enroll(Membership("e", key(), "s"))
    assert (caught.value.status, caught.value.ambiguous) == (503, False)


def test_the_clients_retry_after_reads_an_http_date() -> None:
    assert _retry_after("Wed, 21 Oct 2099 07:28:00 GMT") > 2.2e9
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # passed: now
    assert _retry_after("12") == 12.0
    assert _retry_after(None) == _retry_after("soon") == _retry_after("-3") == 1.0


def test_parse_retry_after() -> None:
    now = datetime(2099, 10, 21, 7, 27, 30, tzinfo=UTC)
    assert parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT", now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2099 07:28:00 -0000", now) == 30.0
    assert parse_retry_after(" 2.5 ", now) == 2.5
    for unreadable in (None, "", "inf", "nan", "-1", "tomorrow", "Wed, 99 Foo 2099"):
        assert parse_retry_after(unreadable, now) is None


@pytest.mark.parametrize(
    ("error", "ambiguous"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("slow connect"), False),
        (httpx.PoolTimeout("pool"), False),
        (httpx.WriteError("broken pipe"), False),
        (httpx.ReadTimeout("slow answer"), True),
        (httpx.ReadError("reset"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
        (httpx.DecodingError("bad gzip"), True),
    ],
)
def test_transport_errors_say_whether_the_request_may_have_been_applied(
    error: httpx.HTTPError, ambiguous: bool
) -> None:
    mapped = transport_error("POST", "/x", error)
    assert isinstance(mapped, CrmUnavailable)
    assert (mapped.ambiguous, mapped.status) == (ambiguous, None)


def test_own_mode_config_keeps_its_defaults(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=tmp_path / "crm.db")
    assert (config.mode, config.token, config.daily_limit) == ("own", None, None)
    with pytest.raises(ValueError, match="mode"):
        SandboxConfig(db_path=tmp_path / "crm.db", mode="salesforce")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time zone"):
        SandboxConfig(db_path=tmp_path / "crm.db", daily_reset_timezone="Mars/Olympus")
