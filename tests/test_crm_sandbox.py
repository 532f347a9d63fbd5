"""The CRM connector against the sandbox CRM served over real localhost sockets.

Each server is uvicorn in a background thread on a socket bound here (port 0, or a given port
for the restart test), so the client goes through the kernel's TCP stack like in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from cohortflow.crm.client import (
    ContactRecord,
    ContactUpsert,
    CrmClient,
    EnrollmentResult,
    ListMembershipResult,
    UpsertResult,
)
from cohortflow.crm.errors import CrmRateLimited, CrmRejected, CrmUnavailable
from cohortflow.crm.sandbox import SandboxConfig, create_app

HOST = "127.0.0.1"


class SandboxServer:
    """The sandbox app served by uvicorn in a thread, on a socket bound before it starts."""

    def __init__(self, config: SandboxConfig, port: int = 0) -> None:
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that name it, and
        # without it every answer waits ~40 ms on Nagle and delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # The restart test rebinds the port its previous server just closed.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        self.port: int = sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(create_app(config), log_config=None, access_log=False)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the sandbox CRM did not answer /healthz")
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut down gracefully (lifespan closes the store) and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(10)
        assert not self._thread.is_alive(), "the sandbox CRM did not stop"


@contextlib.contextmanager
def running(config: SandboxConfig) -> Iterator[SandboxServer]:
    server = SandboxServer(config)
    try:
        yield server
    finally:
        server.stop()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def logged(url: str, idempotency_key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as raw:
        response = await raw.get("/_sandbox/requests", params={"idempotency_key": idempotency_key})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def inject(url: str, **fault: Any) -> None:
    async with httpx.AsyncClient(base_url=url) as raw:
        (await raw.post("/_sandbox/faults", json=fault)).raise_for_status()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """One sandbox for the tests that need no special config; they use unique ids and keys."""
    config = SandboxConfig(db_path=tmp_path_factory.mktemp("crm") / "crm.db", rate_limit=10_000)
    with running(config) as server:
        yield server


@pytest.fixture
async def crm(shared: SandboxServer) -> AsyncIterator[CrmClient]:
    async with CrmClient(shared.url, token="sandbox-token") as client:
        yield client
    async with httpx.AsyncClient(base_url=shared.url) as raw:
        (await raw.delete("/_sandbox/faults")).raise_for_status()


async def test_upsert_then_read_back_merges_properties(crm: CrmClient) -> None:
    a, b = uid("contact"), uid("contact")
    created = await crm.upsert_contacts(
        [
            ContactUpsert(a, uid("key"), {"email": "a@example.com", "tier": "gold"}),
            ContactUpsert(b, uid("key"), {"tier": "silver"}),
        ]
    )
    assert created == [UpsertResult(a, "created"), UpsertResult(b, "created")]

    updated = await crm.upsert_contacts([ContactUpsert(a, uid("key"), {"tier": "platinum"})])

    assert updated == [UpsertResult(a, "updated")]
    assert await crm.get_contact(a) == ContactRecord(
        a, {"email": "a@example.com", "tier": "platinum"}, [], []
    )
    assert await crm.get_contact(b) == ContactRecord(b, {"tier": "silver"}, [], [])
    assert await crm.get_contact(uid("nobody")) is None


async def test_replayed_key_with_same_body_is_duplicate_and_changes_nothing(
    crm: CrmClient,
) -> None:
    contact = uid("contact")
    first = ContactUpsert(contact, uid("key"), {"tier": "gold"})
    await crm.upsert_contacts([first])
    await crm.upsert_contacts([ContactUpsert(contact, uid("key"), {"tier": "silver"})])

    replayed = await crm.upsert_contacts([first])

    assert replayed == [UpsertResult(contact, "duplicate")]
    record = await crm.get_contact(contact)
    assert record is not None
    assert record.properties == {"tier": "silver"}


async def test_reused_key_with_other_body_rejects_the_whole_batch(crm: CrmClient) -> None:
    known, fresh_id = uid("contact"), uid("contact")
    key = uid("key")
    await crm.upsert_contacts([ContactUpsert(known, key, {"tier": "gold"})])
    fresh = ContactUpsert(fresh_id, uid("key"), {"tier": "new"})

    with pytest.raises(CrmRejected) as caught:
        await crm.upsert_contacts([fresh, ContactUpsert(known, key, {"tier": "changed"})])

    assert caught.value.status == 422
    assert caught.value.field == "inputs[1].idempotency_key"
    assert await crm.get_contact(fresh_id) is None
    record = await crm.get_contact(known)
    assert record is not None
    assert record.properties == {"tier": "gold"}
    # The refused batch did not use up the valid record's key either.
    assert await crm.upsert_contacts([fresh]) == [UpsertResult(fresh_id, "created")]


async def test_server_validation_names_the_field(crm: CrmClient) -> None:
    with pytest.raises(CrmRejected) as empty_id:
        await crm.upsert_contacts([ContactUpsert("", uid("key"), {})])
    twice = uid("contact")
    with pytest.raises(CrmRejected) as repeated_id:
        await crm.upsert_contacts(
            [ContactUpsert(twice, uid("key"), {}), ContactUpsert(twice, uid("key"), {})]
        )

    assert (empty_id.value.status, empty_id.value.field) == (422, "inputs[0].id")
    assert (repeated_id.value.status, repeated_id.value.field) == (422, "inputs[1].id")
    assert await crm.get_contact(twice) is None


async def test_batch_limits_client_side_and_server_side(
    crm: CrmClient, shared: SandboxServer
) -> None:
    records = [ContactUpsert(uid("contact"), uid("key"), {}) for _ in range(101)]
    with pytest.raises(ValueError, match="1 to 100"):
        await crm.upsert_contacts(records)
    with pytest.raises(ValueError, match="1 to 100"):
        await crm.upsert_contacts([])
    with pytest.raises(ValueError, match="idempotency key"):
        await crm.upsert_contacts([ContactUpsert(uid("contact"), "", {})])

    inputs = [
        {"id": r.contact_id, "idempotency_key": r.idempotency_key, "properties": {}}
        for r in records
    ]
    async with httpx.AsyncClient(base_url=shared.url) as raw:
        response = await raw.post("/crm/v3/objects/contacts/batch/upsert", json={"inputs": inputs})

    assert response.status_code == 422
    assert response.json()["field"] == "inputs"
    assert await crm.get_contact(records[0].contact_id) is None


async def test_rate_limit_answers_429_with_an_honest_retry_after(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=tmp_path / "crm.db", rate_limit=3, window_seconds=2.0)
    with running(config) as server:
        async with CrmClient(server.url) as crm:
            for _ in range(3):
                assert await crm.get_contact("nobody") is None
            record = ContactUpsert(uid("contact"), uid("key"), {"tier": "gold"})

            with pytest.raises(CrmRateLimited) as caught:
                await crm.upsert_contacts([record])

            assert 1 <= caught.value.retry_after <= 2
            assert await crm.healthy(), "/healthz is not rate limited"
            log = await logged(server.url, record.idempotency_key)
            assert [r["status"] for r in log["requests"]] == [429]

            # Refused requests do not count, so hammering does not push the window out and
            # Retry-After stays a promise: after it, the request gets through and writes once.
            await asyncio.sleep(1)
            for _ in range(3):
                with pytest.raises(CrmRateLimited) as hammered:
                    await crm.get_contact("nobody")
                assert hammered.value.retry_after == 1
            await asyncio.sleep(hammered.value.retry_after)
            assert await crm.upsert_contacts([record]) == [
                UpsertResult(record.contact_id, "created")
            ]


async def test_injected_429_then_success(crm: CrmClient, shared: SandboxServer) -> None:
    record = ContactUpsert(uid("contact"), uid("key"), {"tier": "gold"})
    await inject(shared.url, status=429, count=1, retry_after=7)

    with pytest.raises(CrmRateLimited) as caught:
        await crm.upsert_contacts([record])
    retried = await crm.upsert_contacts([record])

    assert caught.value.retry_after == 7
    # "created", not "duplicate": the fault answered before anything was written.
    assert retried == [UpsertResult(record.contact_id, "created")]
    log = await logged(shared.url, record.idempotency_key)
    assert [r["status"] for r in log["requests"]] == [429, 200]


async def test_injected_503_is_unavailable_on_matching_paths_only(
    crm: CrmClient, shared: SandboxServer
) -> None:
    contact, key = uid("contact"), uid("key")
    await crm.upsert_contacts([ContactUpsert(contact, uid("key"), {})])
    await inject(shared.url, status=503, count=2, path_prefix="/crm/v3/sequences/")

    for _ in range(2):
        with pytest.raises(CrmUnavailable) as caught:
            await crm.enroll_in_sequence(contact, "winback", key)
        assert caught.value.status == 503
        assert await crm.get_contact(contact) is not None, "other paths are not faulted"
    enrolled = await crm.enroll_in_sequence(contact, "winback", key)

    assert enrolled == EnrollmentResult(contact, "winback", "enrolled")
    log = await logged(shared.url, key)
    assert [r["status"] for r in log["requests"]] == [503, 503, 200]


async def test_enrolment_happens_once(crm: CrmClient) -> None:
    contact, key = uid("contact"), uid("key")
    ghost_key = uid("key")
    with pytest.raises(CrmRejected) as unknown:
        await crm.enroll_in_sequence(contact, "winback", ghost_key)
    await crm.upsert_contacts([ContactUpsert(contact, uid("key"), {})])

    first = await crm.enroll_in_sequence(contact, "winback", key)
    replayed = await crm.enroll_in_sequence(contact, "winback", key)
    other_key = await crm.enroll_in_sequence(contact, "winback", uid("key"))
    with pytest.raises(CrmRejected) as reused:
        await crm.enroll_in_sequence(contact, "onboarding", key)
    after_404 = await crm.enroll_in_sequence(contact, "nurture", ghost_key)

    assert (unknown.value.status, unknown.value.field) == (404, "contact_id")
    assert first.status == "enrolled"
    assert replayed.status == "duplicate"
    assert other_key.status == "already_enrolled"
    assert (reused.value.status, reused.value.field) == (422, "idempotency_key")
    assert after_404.status == "enrolled", "a 404 does not use up the key"
    record = await crm.get_contact(contact)
    assert record is not None
    assert record.sequences == ["winback", "nurture"]


async def test_list_membership_happens_once(crm: CrmClient) -> None:
    contact, key = uid("contact"), uid("key")
    await crm.upsert_contacts([ContactUpsert(contact, uid("key"), {})])

    first = await crm.add_to_list(contact, "vip", key)
    replayed = await crm.add_to_list(contact, "vip", key)
    other_key = await crm.add_to_list(contact, "vip", uid("key"))

    assert first == ListMembershipResult(contact, "vip", "added")
    assert replayed.status == "duplicate"
    assert other_key.status == "already_member"
    record = await crm.get_contact(contact)
    assert record is not None
    assert (record.lists, record.sequences) == (["vip"], [])


async def test_request_log_counts_every_attempt(crm: CrmClient, shared: SandboxServer) -> None:
    record = ContactUpsert(uid("contact"), uid("key"), {"tier": "gold"})
    bystander = ContactUpsert(uid("contact"), uid("key"), {})
    await crm.upsert_contacts([record, bystander])
    await crm.upsert_contacts([record])
    with pytest.raises(CrmRejected):
        await crm.upsert_contacts([ContactUpsert(record.contact_id, record.idempotency_key, {})])

    log = await logged(shared.url, record.idempotency_key)

    assert log["count"] == 3
    assert [r["status"] for r in log["requests"]] == [200, 200, 422]
    assert {r["path"] for r in log["requests"]} == {"/crm/v3/objects/contacts/batch/upsert"}
    assert log["requests"][0]["idempotency_keys"] == [
        record.idempotency_key,
        bystander.idempotency_key,
    ]
    assert (await logged(shared.url, bystander.idempotency_key))["count"] == 1


async def test_restart_keeps_data_and_dedupe_state(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=tmp_path / "crm.db")
    record = ContactUpsert(uid("contact"), uid("key"), {"tier": "gold"})
    enrol_key = uid("key")
    first = SandboxServer(config)
    async with CrmClient(first.url) as crm:
        try:
            await crm.upsert_contacts([record])
            await crm.enroll_in_sequence(record.contact_id, "winback", enrol_key)
        finally:
            first.stop()
        assert not await crm.healthy()

        second = SandboxServer(config, port=first.port)
        try:
            replayed = await crm.upsert_contacts([record])
            enrolment = await crm.enroll_in_sequence(record.contact_id, "winback", enrol_key)
            stored = await crm.get_contact(record.contact_id)
            log = await logged(second.url, record.idempotency_key)
        finally:
            second.stop()

    assert replayed == [UpsertResult(record.contact_id, "duplicate")]
    assert enrolment.status == "duplicate"
    assert stored == ContactRecord(record.contact_id, {"tier": "gold"}, ["winback"], [])
    assert log["count"] == 2


async def test_timeouts_and_random_failures_are_unavailable(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=tmp_path / "crm.db", error_rate=1.0, latency_ms=300)
    with running(config) as server:
        async with CrmClient(server.url, timeout=0.1) as impatient:
            with pytest.raises(CrmUnavailable) as timed_out:
                await impatient.get_contact("anyone")
        async with CrmClient(server.url) as patient:
            started = time.monotonic()
            with pytest.raises(CrmUnavailable) as failed:
                await patient.get_contact("anyone")
            elapsed = time.monotonic() - started
            assert await patient.healthy(), "/healthz is neither delayed nor failed"

    assert timed_out.value.status is None
    assert failed.value.status == 503
    assert elapsed >= 0.3


async def test_error_rate_is_seeded(tmp_path: Path) -> None:
    async def outcomes(db_path: Path) -> list[bool]:
        config = SandboxConfig(db_path=db_path, error_rate=0.5, seed=42)
        with running(config) as server:
            async with CrmClient(server.url) as crm:
                results = []
                for _ in range(20):
                    try:
                        await crm.get_contact("anyone")
                        results.append(True)
                    except CrmUnavailable:
                        results.append(False)
                return results

    first = await outcomes(tmp_path / "a.db")
    second = await outcomes(tmp_path / "b.db")

    assert first == second
    assert any(first) and not all(first)


async def test_unreachable_crm_is_unavailable_and_unhealthy() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    async with CrmClient(f"http://{HOST}:{port}", timeout=1) as crm:
        assert not await crm.healthy()
        with pytest.raises(CrmUnavailable) as caught:
            await crm.get_contact("anyone")

    assert caught.value.status is None
