"""Erasure with the proof intact: ``storage.erasure`` on SQLite and PostgreSQL (no canary
left in any table but the pseudonymous audit chain, which still verifies), ``cohortflow
customer forget`` and legal holds as real processes against the sandbox CRM, the HubSpot
mode's GDPR delete, and a waiting campaign terminated on the dev server."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from cohortflow.audit.chain import GENESIS_HASH
from cohortflow.crm.connector import ContactWrite
from cohortflow.crm.hubspot import HubSpotConnector
from cohortflow.crm.sandbox_connector import SandboxConnector
from cohortflow.erasure import Forgetter
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import audit, cohorts, consent, customers, signal_outbox
from cohortflow.storage.db import Database
from cohortflow.storage.erasure import erase_customer, erased_message_id
from cohortflow.storage.events import EventRecord, insert_events
from cohortflow.storage.tables import Consent, Customer, Event
from tests.harness import (
    HUBSPOT_TOKEN,
    Harness,
    hubspot_sandbox,
    serve_sandbox,
    spec_document,
    wait_for_state,
    who,
    without_approval,
)
from tests.test_cli import CUSTOMER, OTHER, assert_refused, cli_env, cohortflow, prepare
from workflows.campaign.contract import CampaignState

SOURCE, EMAIL = "canary-src-4417", "canary-4417@example.com"
SECRET_PROPERTY, POLICY_TEXT = "canary-coupon-4417", "canary policy text 4417"
KEY = "c_" + "e" * 24
T0 = datetime(2026, 11, 1, tzinfo=UTC)


async def seed(db: Database) -> None:
    """One customer with personal data in every table that can hold it."""
    async with db.transaction() as session:
        await customers.upsert_customers(
            session,
            [customers.CustomerRecord(KEY, SOURCE, EMAIL, "Europe/Paris", {"plan": SOURCE})],
        )
        await customers.upsert_features(session, [(KEY, {"recency_days": 3.0}, T0)])
        await insert_events(
            session,
            [
                EventRecord(f"msg-{SOURCE}-{i}", KEY, "track", "purchase", T0,
                            {"coupon": SECRET_PROPERTY}, {"context": {"ip": SOURCE}})
                for i in range(3)
            ],
        )  # fmt: skip
        await session.execute(
            text("INSERT INTO profile_aliases (alias_key, customer_key, merged_at)"
                 " VALUES ('c_anon', :key, :at)"),
            {"key": KEY, "at": T0},
        )  # fmt: skip
        evidence = consent.ConsentEvidence("api", "web", "v3", POLICY_TEXT)
        await consent.set_consent(session, KEY, "email", "marketing", True, "web", T0, evidence)
        await cohorts.apply_membership(session, "vip", {KEY}, evaluation_id="e1", now=T0)
        owed = signal_outbox.OwedSignal(f"msg-{SOURCE}-0", KEY, {"coupon": SECRET_PROPERTY})
        await signal_outbox.owe(session, [owed], now=T0)
        await audit.append_audit(
            session, audit.AuditEvent("campaign:x:" + KEY, "score", "scored", "x", KEY, {})
        )


async def every_text(db: Database) -> str:
    """Every row of every table but the audit chain, as text."""
    async with db.read_transaction() as session:
        names = await session.run_sync(
            lambda s: s.connection().dialect.get_table_names(s.connection())
        )
        dumped = []
        for name in sorted(set(names) - {"audit_log", "alembic_version"}):
            rows = await session.execute(text(f'SELECT * FROM "{name}"'))
            dumped += [repr(tuple(row)) for row in rows]
    return "\n".join(dumped)


async def test_erasure_leaves_no_personal_data_and_the_chain_verifies(db: Database) -> None:
    await seed(db)
    canaries = (SOURCE, EMAIL, SECRET_PROPERTY, POLICY_TEXT)
    before = await every_text(db)
    assert all(c in before for c in canaries)  # the scan sees them first
    async with db.transaction() as session:
        erased = await erase_customer(session, KEY)
    assert (erased.events, erased.aliases, erased.consent_texts) == (3, 1, 1)
    assert (erased.consents_revoked, erased.memberships) == (1, 1)
    assert [c for c in canaries if c in await every_text(db)] == []

    async with db.read_transaction() as session:
        row = await session.get(Customer, KEY)
        assert row is not None and row.erased_at is not None
        assert (row.source_id, row.email, row.attributes) == (f"erased:{KEY}", None, {})
        events = (await session.scalars(select(Event).order_by(Event.message_id))).all()
        assert sorted(e.message_id for e in events) == sorted(
            erased_message_id(f"msg-{SOURCE}-{i}") for i in range(3)
        )
        assert {(e.event, json.dumps(e.properties), e.raw) for e in events} == {
            ("purchase", "{}", None)
        }
        granted = await session.scalars(select(Consent.granted).where(Consent.customer_key == KEY))
        assert list(granted) == [False]
        report = await audit.verify_chain(session)
        assert (report.ok, report.rows) == (True, 1) and report.head_hash != GENESIS_HASH
    async with db.transaction() as session:
        again = await erase_customer(session, KEY)
    assert (again.events, again.aliases, again.consents_revoked) == (0, 0, 0)


# ---------------------------------------------------------------- the command


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    await prepare(path)
    return path


def run_cli(data_dir: Path, crm_url: str, *args: str | Path) -> Any:
    env = {**cli_env(), "COHORTFLOW_CRM_URL": crm_url, "COHORTFLOW_LOCAL_IDENTITY": "dpo"}
    return cohortflow(*args, "--data-dir", data_dir, env=env)


async def test_forget_erases_deletes_the_contact_and_a_hold_exports_instead(
    data_dir: Path, tmp_path: Path
) -> None:
    key = Pseudonymiser.from_settings(Settings(data_dir=data_dir), create=False).customer_key
    with serve_sandbox(tmp_path / "crm.db") as crm:
        async with SandboxConnector(crm.url) as connector:
            for source in (CUSTOMER, OTHER):
                write = ContactWrite(f"seed:{source}", key(source), {"email": f"{source}@x.io"})
                assert (await connector.upsert_contacts([write]))[0].ok
        # A customer under legal hold is exported, not erased, and the refusal says why.
        held = run_cli(data_dir, crm.url, "customer", "hold", OTHER, "--reason", "litigation 7")
        assert held.code == 0, held
        refused = run_cli(data_dir, crm.url, "customer", "forget", OTHER, "--reason", "req 1")
        assert_refused(refused, "under legal hold (litigation 7): not erased", "exported to")
        exported = data_dir / "exports" / f"{key(OTHER)}.audit.jsonl"
        assert cohortflow("audit", "verify", "--file", exported).code == 0
        async with SandboxConnector(crm.url) as connector:
            assert await connector.read_contact(key(OTHER)) is not None

        done = run_cli(data_dir, crm.url, "customer", "forget", CUSTOMER, "--reason", "req 2")
        assert done.code == 0, done
        assert done.stdout.startswith(f"{key(CUSTOMER)} erased: ")
        assert done.stdout.rstrip().endswith("CRM contact deleted")
        async with SandboxConnector(crm.url) as connector:
            assert await connector.read_contact(key(CUSTOMER)) is None
        # Released, the other may go too; a stranger is refused by name.
        assert run_cli(data_dir, crm.url, "customer", "release", OTHER).code == 0
        assert run_cli(data_dir, crm.url, "customer", "forget", OTHER, "--reason", "r").code == 0
        stranger = run_cli(data_dir, crm.url, "customer", "forget", "nobody-9", "--reason", "r")
        assert_refused(stranger, "no customer 'nobody-9'")
    verified = cohortflow("audit", "verify", "--data-dir", data_dir)
    assert verified.code == 0, verified
    why = cohortflow("audit", "why", key(CUSTOMER), "--json", "--data-dir", data_dir)
    told = [json.loads(line)["text"] for line in why.stdout.splitlines()]
    assert told[-1] == "personal data erased by dpo: req 2"
    with (data_dir / "cohortflow.db").open("rb") as f:
        stored = f.read()
    assert f"{CUSTOMER}@example.com".encode() not in stored


async def test_the_hubspot_mode_deletes_a_contact_for_good(tmp_path: Path) -> None:
    with hubspot_sandbox(tmp_path / "hs.db") as url:
        async with HubSpotConnector(url, token=HUBSPOT_TOKEN) as connector:
            write = ContactWrite("seed:hs1", "c_hs1", {"email": "hs1@example.com"})
            assert (await connector.upsert_contacts([write]))[0].ok
            assert await connector.read_contact("c_hs1") is not None
            assert (await connector.delete_contact("c_hs1")).ok
            assert await connector.read_contact("c_hs1") is None
            assert (await connector.delete_contact("c_hs1")).ok  # nothing left: still ok


@pytest.mark.devserver
async def test_forget_terminates_the_customers_waiting_campaign(
    dev_harness: Harness, tmp_path: Path
) -> None:
    pseudonymiser = Pseudonymiser(b"e" * 32)
    source = f"gone-{uuid.uuid4().hex[:6]}"
    key = await dev_harness.customer(key=pseudonymiser.customer_key(source))
    spec, version = await dev_harness.apply(without_approval(spec_document()))
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        async with SandboxConnector(dev_harness.sandbox.url) as connector:
            forgetter = Forgetter(dev_harness.db, pseudonymiser, connector, dev_harness.client)
            done = await forgetter.forget(source, who("dpo", "admin"), "request 3", tmp_path)
    assert (done.campaigns_terminated, done.crm_deleted) == (1, True)
    assert (await dev_harness.describe(handle)).status.name == "TERMINATED"
    async with SandboxConnector(dev_harness.sandbox.url) as connector:
        assert await connector.read_contact(key) is None
