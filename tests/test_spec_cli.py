"""`cohortflow campaign schema|validate|apply|list|show|diff|preview|report` as an operator
runs them: a real process, a real SQLite database, exit codes and output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from cohortflow.campaigns.report import Arm, build_report, newcombe, render
from cohortflow.storage import audit, campaigns, consent, customers
from cohortflow.storage.db import Database, migrate
from cohortflow.storage.events import EventRecord, insert_events
from cohortflow.storage.tables import AuditRow
from tests.harness import FEATURES

ROOT = Path(__file__).resolve().parents[1]
DRIP = ROOT / "examples" / "onboarding_drip.yaml"
WINBACK = ROOT / "examples" / "winback_sensitive.yaml"


def cli(
    data_dir: Path | None, *args: str, identity: str = "alice", roles: str = '["admin"]'
) -> subprocess.CompletedProcess[str]:
    """``cohortflow ARGS`` as the local identity ``identity`` with ``roles`` (a JSON list)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    env |= {"COHORTFLOW_LOCAL_IDENTITY": identity, "COHORTFLOW_LOCAL_ROLES": roles}
    where = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.run(
        [sys.executable, "-m", "cohortflow", *args, *where],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    await migrate(f"sqlite+aiosqlite:///{(tmp_path / 'cohortflow.db').resolve()}")
    return tmp_path


def database(data_dir: Path) -> Database:
    return Database(f"sqlite+aiosqlite:///{(data_dir / 'cohortflow.db').resolve()}")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_schema_is_the_json_schema_of_a_spec() -> None:
    result = cli(None, "campaign", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "CampaignSpec"
    assert "quiet_hours" in schema["properties"]


async def test_a_bad_spec_lists_every_problem_exits_2_and_stores_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    document = yaml.safe_load(DRIP.read_text())
    document["steps"][2]["timeout"] = "P3X"
    document["steps"][4]["next"] = "nowhere"
    bad.write_text(yaml.safe_dump(document))
    validated = cli(None, "campaign", "validate", str(bad))
    assert validated.returncode == 2
    assert lines(validated.stderr) == [
        "steps[2].timeout: 'P3X' is not an ISO-8601 duration such as P3D or PT30S",
        "steps[4].next: unknown step 'nowhere'",
    ]
    applied = cli(data_dir, "campaign", "apply", str(bad))
    assert (applied.returncode, lines(applied.stderr)) == (2, lines(validated.stderr))
    db = database(data_dir)
    async with db.transaction() as session:
        assert await campaigns.list_campaigns(session) == []
    await db.dispose()


async def test_apply_makes_a_version_only_when_the_spec_changed(
    data_dir: Path, tmp_path: Path
) -> None:
    assert cli(None, "campaign", "validate", str(DRIP)).returncode == 0
    first = cli(data_dir, "campaign", "apply", str(DRIP))
    assert first.stdout.strip() == "onboarding_drip: stored version 1", first.stderr
    again = cli(data_dir, "campaign", "apply", str(DRIP), identity="bob")
    assert again.stdout.strip() == "onboarding_drip: unchanged, still version 1"
    changed = tmp_path / "drip.yaml"
    changed.write_text(DRIP.read_text().replace("timeout: P3D", "timeout: P5D"))
    second = cli(data_dir, "campaign", "apply", str(changed), identity="bob")
    assert second.stdout.strip() == "onboarding_drip: stored version 2"
    operator_only = cli(data_dir, "campaign", "apply", str(DRIP), roles='["operator"]')
    assert operator_only.returncode == 2
    assert lines(operator_only.stderr) == [
        "cohortflow: error: alice needs role admin to apply campaigns"
    ]
    listed = lines(cli(data_dir, "campaign", "list").stdout)
    assert [line.split() for line in listed] == [["onboarding_drip", "active", "v2"]]
    # Each new version is on record with who applied it; the unchanged apply is not.
    db = database(data_dir)
    async with db.transaction() as session:
        rows = await audit.audit_for_workflow(session, "campaign:onboarding_drip")
    await db.dispose()
    recorded = [(r.kind, json.loads(r.payload)) for r in rows]
    assert [(kind, p["by"], p["version"]) for kind, p in recorded] == [
        ("campaign_applied", "alice", 1),
        ("campaign_applied", "bob", 2),
    ]
    shown = cli(data_dir, "campaign", "show", "onboarding_drip", "--version", "1").stdout
    assert shown.startswith("# onboarding_drip version 1")
    assert yaml.safe_load(shown)["steps"][2]["timeout"] == "P3D"
    diff = lines(cli(data_dir, "campaign", "diff", "onboarding_drip", "1", "2").stdout)
    assert [d for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---")] == [
        "-  timeout: P3D",
        "+  timeout: P5D",
    ]
    missing = cli(data_dir, "campaign", "show", "onboarding_drip", "--version", "9")
    assert missing.returncode == 2
    assert lines(missing.stderr) == ["cohortflow: error: campaign onboarding_drip has no version 9"]


async def store_customer(data_dir: Path, key: str, granted: bool, **features: float) -> None:
    db = database(data_dir)
    async with db.transaction() as session:
        await customers.upsert_customers(
            session,
            [customers.CustomerRecord(key, f"src-{key}", f"{key}@example.com", "Asia/Tokyo")],
        )
        await customers.upsert_features(
            session, [(key, {**FEATURES, **features}, datetime.now(UTC))]
        )
        await consent.set_consent(session, key, "email", "marketing", granted, "tests")
    await db.dispose()


async def audit_rows(data_dir: Path) -> int:
    db = database(data_dir)
    async with db.transaction() as session:
        count = await session.scalar(select(func.count()).select_from(AuditRow))
    await db.dispose()
    return int(count or 0)


def preview(data_dir: Path, *args: str) -> list[str]:
    result = cli(data_dir, "campaign", "preview", *args)
    assert result.returncode == 0, result.stderr
    return lines(result.stdout)


async def test_preview_shows_a_customers_path_and_writes_nothing(
    data_dir: Path, registry_root: Path
) -> None:
    shutil.copytree(registry_root, data_dir / "models")
    await store_customer(data_dir, "c_preview_consented", True)
    await store_customer(data_dir, "c_preview_opted_out", False)
    out = preview(data_dir, str(DRIP), "--customer", "c_preview_consented")
    assert out[0] == "customer c_preview_consented, arm treatment"
    assert [line.split()[0] for line in out[1:-1]] == [
        "label",
        "welcome",
        "first_purchase",
        "morning",
        "nudge",
        "last_chance",
        "lapsed",
    ]
    assert "would set_properties cohort_label=new_signups, lifecycle_stage=onboarding" in out[1]
    assert out[-1] == "ends: completed (reached exit step lapsed)"
    bought = preview(
        data_dir, str(DRIP), "--customer", "c_preview_consented", "--event", "purchase"
    )
    assert [line.split()[0] for line in bought[1:-1]] == [
        "label",
        "welcome",
        "first_purchase",
        "thank",
        "done",
    ]
    blocked = preview(data_dir, str(DRIP), "--customer", "c_preview_opted_out")
    assert blocked[-1] == "ends: consent_blocked (consent missing for email/marketing)"
    assert await audit_rows(data_dir) == 0


async def test_preview_counts_the_frequency_cap_from_the_audit_trail(
    data_dir: Path, registry_root: Path
) -> None:
    shutil.copytree(registry_root, data_dir / "models")
    await store_customer(data_dir, "c_preview_busy", True)
    db = database(data_dir)
    async with db.transaction() as session:
        for n in range(3):
            await audit.append_audit(
                session,
                audit.AuditEvent(f"w{n}", "s", "crm_written", "other", "c_preview_busy", {}),
            )
    await db.dispose()
    out = preview(data_dir, str(DRIP), "--customer", "c_preview_busy")
    assert "frequency cap reached (3/3): skipped" in out[1]
    assert await audit_rows(data_dir) == 3


ENTERED = datetime(2026, 3, 2, 9, tzinfo=UTC)


async def seed_outcomes(
    data_dir: Path,
    outcomes: Sequence[tuple[str, str, bool]],
    *,
    entered: Sequence[datetime] = (),
) -> None:
    """Entries of winback_sensitive (customer ``c_N`` entering at ``entered[N]``, else
    ENTERED) with their arm, end state and whether they bought a day after entering."""
    db = database(data_dir)
    async with db.transaction() as session:
        spec: dict[str, Any] = yaml.safe_load(WINBACK.read_text())
        await campaigns.save_spec_version(session, spec["campaign_id"], spec, "tests")
        for n, (variant, state, converted) in enumerate(outcomes):
            workflow_id = f"campaign:winback_sensitive:c_{n}:1"
            at = entered[n] if n < len(entered) else ENTERED
            await campaigns.record_entry(
                session,
                workflow_id=workflow_id,
                campaign_id="winback_sensitive",
                customer_key=f"c_{n}",
                entry_id="1",
                cohort_id="lapsing_high_value",
                version=1,
                launched_at=at,
            )
            rows = [("entry", "variant_assigned", {"variant": variant})]
            rows.append(("finish", "finished", {"state": state, "variant": variant}))
            for step, kind, payload in rows:
                await audit.append_audit(
                    session,
                    audit.AuditEvent(
                        workflow_id, step, kind, "winback_sensitive", f"c_{n}", payload
                    ),
                )
            if converted:
                await insert_events(session, [purchase(f"c_{n}", at + timedelta(days=1))])
    await db.dispose()


def purchase(key: str, at: datetime, event: str = "purchase") -> EventRecord:
    return EventRecord(f"m-{key}-{event}-{at.isoformat()}", key, "track", event, at)


async def test_report_counts_arms_and_the_uplift_from_ingested_conversions(
    data_dir: Path,
) -> None:
    outcomes = [("treatment", "completed", n < 30) for n in range(100)]
    outcomes += [("control", "completed", n < 10) for n in range(100)]
    outcomes += [("treatment", "exited", False)]
    await seed_outcomes(data_dir, outcomes)
    spec = yaml.safe_load(WINBACK.read_text())
    db = database(data_dir)
    async with db.transaction() as session:
        built = await build_report(session, "winback_sensitive", spec)
    await db.dispose()
    assert (built.entered, built.states) == (201, {"completed": 200, "exited": 1})
    assert built.arms == {"treatment": Arm(101, 100, 30), "control": Arm(100, 100, 10)}
    assert built.uplift == newcombe(30, 101, 10, 100)
    assert built.notes == []
    text = render(built)
    assert text[-2] == "conversion: purchase (from events)"
    assert text[-1].startswith("uplift (treatment - control): +19.7% (95% CI +")


async def test_report_counts_only_the_conversion_event_within_each_entrys_window(
    data_dir: Path,
) -> None:
    later = ENTERED + timedelta(days=20)
    outcomes = [("treatment", "completed", False)] * 4 + [("control", "completed", False)] * 2
    await seed_outcomes(data_dir, outcomes, entered=[ENTERED] * 4 + [ENTERED, later])
    db = database(data_dir)
    async with db.transaction() as session:
        await insert_events(
            session,
            [
                purchase("c_0", ENTERED + timedelta(days=29)),  # within P30D: converted
                purchase("c_1", ENTERED + timedelta(days=31)),  # after the window
                purchase("c_2", ENTERED - timedelta(days=1)),  # before entering
                purchase("c_3", ENTERED + timedelta(days=1), event="page_view"),  # not the goal
                purchase("c_4", ENTERED + timedelta(days=2)),  # control, converted
                purchase("c_5", ENTERED + timedelta(days=2)),  # before its own (later) entry
            ],
        )
    async with db.transaction() as session:
        built = await build_report(
            session, "winback_sensitive", yaml.safe_load(WINBACK.read_text())
        )
    await db.dispose()
    assert (built.arms["treatment"].converted, built.arms["control"].converted) == (1, 1)
    assert built.conversion_event == "purchase"


async def test_report_command_prints_the_arms(data_dir: Path) -> None:
    await seed_outcomes(data_dir, [("treatment", "completed", True), ("control", "exited", False)])
    result = cli(data_dir, "campaign", "report", "winback_sensitive")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert out[:2] == ["campaign winback_sensitive: 2 entered", "states: completed 1, exited 1"]
    assert out[3].split()[:3] == ["control", "1", "0"]
    assert out[4].split()[:3] == ["treatment", "1", "1"]
    unknown = cli(data_dir, "campaign", "report", "nope")
    assert (unknown.returncode, lines(unknown.stderr)) == (
        2,
        ["cohortflow: error: no campaign 'nope'"],
    )
