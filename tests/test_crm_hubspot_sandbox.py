"""The sandbox CRM's ``hubspot`` mode as a server: one uvicorn process hit by several client
processes, a restart, and ``cohortflow crm-sandbox --mode hubspot``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx

from cohortflow.crm.connector import ContactState, ContactWrite, Membership
from cohortflow.crm.hubspot import HubSpotConnector
from cohortflow.crm.sandbox import SandboxConfig, create_app
from cohortflow.runtime.ports import free_port
from tests.harness import serve_app

TOKEN = "pat-sandbox"
CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    from cohortflow.crm.connector import ContactState, ContactWrite, Membership
    from cohortflow.crm.hubspot import HubSpotConnector

    async def main(url: str, prefix: str) -> None:
        async with HubSpotConnector(
            url, "{token}", sender_email="rep@example.com", user_id="1"
        ) as crm:
            for batch in range(4):
                keys = [f"{{prefix}}-{{batch}}-{{i}}" for i in range(25)]
                writes = [ContactWrite("w-" + k, k, {{"tier": "gold"}}) for k in keys]
                outcomes = await crm.upsert_contacts(writes)
                assert all(o.ok for o in outcomes), outcomes
                members = [Membership("l-" + k, k, "55") for k in keys]
                assert all(o.ok for o in await crm.add_to_list("55", members))
                enrolled = await crm.enroll(Membership("e-" + keys[0], keys[0], "seq"))
                assert enrolled.ok, enrolled

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
).format(token=TOKEN)


def test_one_server_many_client_processes(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=tmp_path / "crm.db", mode="hubspot", token=TOKEN)
    with serve_app(create_app(config)) as url:
        clients = [
            subprocess.Popen([sys.executable, "-c", CLIENT, url, f"p{n}"], cwd=Path.cwd())
            for n in range(3)
        ]
        codes = [client.wait(timeout=120) for client in clients]
        contacts = httpx.get(f"{url}/_sandbox/contacts").json()
        effects = httpx.get(f"{url}/_sandbox/effects").json()
        stats = httpx.get(f"{url}/_sandbox/stats").json()

    assert codes == [0, 0, 0]
    assert contacts["count"] == 3 * 4 * 25
    assert all(
        c["upserts"] == 1 and c["properties"]["tier"] == "gold" for c in contacts["contacts"]
    )
    assert sum(m["adds"] for m in effects["list_memberships"]) == 300
    assert sum(e["count"] for e in effects["enrollments"]) == 12
    assert (effects["duplicate_enrollments"], effects["duplicate_list_adds"]) == (0, 0)
    assert stats["by_status"] == {"200": 3 * 4 * 3}


async def test_a_restart_keeps_contacts_and_effects(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=tmp_path / "crm.db", mode="hubspot")
    a = uuid.uuid4().hex
    with serve_app(create_app(config)) as url:
        async with HubSpotConnector(url, sender_email="r@example.com", user_id="1") as crm:
            await crm.upsert_contacts([ContactWrite(f"w-{a}", a, {"tier": "gold"})])
            await crm.enroll(Membership(f"e-{a}", a, "seq"))
    with serve_app(create_app(config)) as url:
        async with HubSpotConnector(url, paths="legacy") as crm:
            state = await crm.read_contact(a, ["tier"])
        async with httpx.AsyncClient(base_url=url) as raw:
            effects = (await raw.get("/_sandbox/effects")).json()

    assert state is not None
    assert (state.properties["tier"], state.sequences) == ("gold", ["seq"])
    assert [e["count"] for e in effects["enrollments"]] == [1]


def test_the_command_serves_hubspot_mode(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "COHORTFLOW_DATA_DIR": str(tmp_path),
        "COHORTFLOW_CRM_SANDBOX_PORT": str(port),
        "COHORTFLOW_CRM_TOKEN": TOKEN,
        "COHORTFLOW_CRM_SANDBOX_DAILY_LIMIT": "5",
    }
    command = [sys.executable, "-m", "cohortflow", "crm-sandbox", "--mode", "hubspot"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.1)
        anonymous = httpx.get(f"{url}/crm/objects/2026-03/contacts/x")
        assert asyncio.run(_read(url, "nobody")) is None
        admitted = httpx.get(
            f"{url}/crm/v3/objects/contacts/x", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    assert health.json() == {"status": "ok", "mode": "hubspot"}
    assert anonymous.status_code == 401
    assert admitted.headers["X-HubSpot-RateLimit-Daily"] == "5"
    assert admitted.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "3"


async def _read(url: str, contact_key: str) -> ContactState | None:
    async with HubSpotConnector(url, TOKEN) as crm:
        return await crm.read_contact(contact_key)
