"""The audit commands run as real processes: exports an outsider can check (``audit export``,
then ``audit verify --file`` with no database at all), ``audit why``, and the
chain's rows written before content hashes were kept still verifying in the store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from cohortflow.audit.chain import GENESIS_HASH, RowContent, legacy_chain_hash
from cohortflow.audit.export import Selection, write_export
from cohortflow.audit.export_file import verify_export
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import audit
from cohortflow.storage.db import Database
from tests.test_cli import CUSTOMER, OTHER, Run, assert_refused, cli_env, cohortflow, prepare


@pytest.fixture(scope="module")
async def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with four audit rows: three of CUSTOMER's, the third of OTHER's."""
    path = tmp_path_factory.mktemp("export") / "data"
    await prepare(path)
    return path


@pytest.fixture
def data_dir(tmp_path: Path, prepared: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    return copy


def offline(*args: str | Path) -> Run:
    """``cohortflow`` with the data dir pointed at nothing: no database to fall back on."""
    env = {**cli_env(), "COHORTFLOW_DATA_DIR": "/nonexistent/cohortflow"}
    return cohortflow(*args, env=env)


def export_customer(data_dir: Path) -> Path:
    target = data_dir.parent / "export.jsonl"
    run = cohortflow(
        "audit", "export", "--customer", CUSTOMER, "--out", target, "--data-dir", data_dir
    )
    assert run.code == 0, run
    assert run.stderr.strip() == f"exported 3 rows to {target}"
    return target


def test_one_customers_export_verifies_offline_and_holds_no_one_elses_rows(
    data_dir: Path,
) -> None:
    key = Pseudonymiser.from_settings(Settings(data_dir=data_dir), create=False).customer_key
    exported = export_customer(data_dir)
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["selection"] == {"customer": key(CUSTOMER)}
    assert (header["first_seq"], header["head_seq"], header["rows"]) == (1, 4, 3)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    # OTHER's row proves the chain by its hashes and says nothing else.
    assert "row" not in rows[2] and key(OTHER) not in exported.read_text()
    assert {r["row"]["customer_key"] for r in rows if "row" in r} == {key(CUSTOMER)}

    ok = offline("audit", "verify", "--file", exported)
    assert ok.code == 0, ok
    assert ok.stdout.startswith(
        f"audit export ok: 3 rows (customer {key(CUSTOMER)}), 1 more proven by their hashes,"
        " up to head seq 4 "
    )
    # The same head the store's own verification reaches.
    chain = cohortflow("audit", "anchor", "--file", data_dir / "a.jsonl", "--data-dir", data_dir)
    assert header["head_hash"] in chain.stdout


def _alter_payload(lines: list[str]) -> list[str]:
    row = json.loads(lines[2])
    row["row"]["payload"] = '{"note":"forged"}'
    return [*lines[:2], json.dumps(row), *lines[3:]]


def _alter_evidence(lines: list[str]) -> list[str]:
    row = json.loads(lines[3])
    row["content_hash"] = "f" * 64
    return [*lines[:3], json.dumps(row), *lines[4:]]


@pytest.mark.parametrize(
    ("damage", "line", "needle"),
    [
        pytest.param(_alter_payload, 3, "seq 2: content does not match", id="altered"),
        pytest.param(_alter_evidence, 4, "seq 3: content does not match", id="evidence-altered"),
        pytest.param(lambda ls: ls[:2] + ls[3:], 3, "expected seq 2, found seq 3", id="removed"),
        pytest.param(
            lambda ls: [ls[0], ls[1], ls[3], ls[2], ls[4]], 3, "expected seq 2", id="reordered"
        ),
        pytest.param(lambda ls: ls[:-1], 5, "removed from its end", id="cut"),
        pytest.param(lambda ls: ls[1:], 1, "not a cohortflow-audit-export header", id="headless"),
    ],
)
def test_verify_file_names_the_first_bad_line(
    data_dir: Path, damage: Callable[[list[str]], list[str]], line: int, needle: str
) -> None:
    exported = export_customer(data_dir)
    exported.write_text("\n".join(damage(exported.read_text().splitlines())) + "\n")
    bad = offline("audit", "verify", "--file", exported)
    assert bad.code == 1, bad
    assert bad.stdout == ""
    assert bad.stderr.startswith(f"audit export BROKEN at line {line}: "), bad.stderr
    assert needle in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_an_export_is_checked_against_an_anchor_held_elsewhere(data_dir: Path) -> None:
    anchors = data_dir.parent / "anchors.jsonl"
    assert cohortflow("audit", "anchor", "--file", anchors, "--data-dir", data_dir).code == 0
    exported = export_customer(data_dir)
    ok = offline("audit", "verify", "--file", exported, "--anchor", anchors)
    assert ok.code == 0, ok
    assert "; reaches its anchor of " in ok.stdout

    # A whole chain rewritten consistently fools the file alone, never the anchor.
    anchor = json.loads(anchors.read_text())
    anchors.write_text(json.dumps({**anchor, "hash": "e" * 64}) + "\n")
    bad = offline("audit", "verify", "--file", exported, "--anchor", anchors)
    assert bad.code == 1, bad
    assert "line 5: seq 4 does not match its anchor" in bad.stderr


def test_export_refuses_a_request_without_a_selection_or_with_a_bad_time(data_dir: Path) -> None:
    assert_refused(cohortflow("audit", "export", "--data-dir", data_dir), "give --customer")
    assert_refused(
        cohortflow("audit", "export", "--since", "last tuesday", "--data-dir", data_dir),
        "since: 'last tuesday' is not an ISO-8601",
    )
    missing = data_dir.parent / "missing.jsonl"
    assert_refused(offline("audit", "verify", "--file", missing), "file:")


def test_an_export_since_a_time_after_every_row_is_empty_and_verifies(data_dir: Path) -> None:
    target = data_dir.parent / "late.jsonl"
    run = cohortflow(
        "audit", "export", "--since", "2999-01-01", "--out", target, "--data-dir", data_dir
    )
    assert run.code == 0, run
    assert len(target.read_text().splitlines()) == 1
    ok = offline("audit", "verify", "--file", target)
    assert ok.code == 0 and ok.stdout.startswith("audit export ok: 0 rows (since 2999-01-01T00"), ok


async def test_rows_written_before_content_hashes_still_verify_and_are_linked_over(
    db: Database,
) -> None:
    content = RowContent("wf-old", "s", "scored", "camp", "c_old", '{"a":1}', "2025-01-01T00:00")
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO audit_log (seq, workflow_id, step_id, kind, campaign_id,"
                " customer_key, payload, created_at, prev_hash, hash) VALUES"
                " (1, :wf, :step, :kind, :campaign, :customer, :payload, :at, :prev, :h)"
            ),
            {
                "wf": content.workflow_id, "step": content.step_id, "kind": content.kind,
                "campaign": content.campaign_id, "customer": content.customer_key,
                "payload": content.payload, "at": content.created_at, "prev": GENESIS_HASH,
                "h": legacy_chain_hash(1, GENESIS_HASH, content),
            },
        )  # fmt: skip
        event = audit.AuditEvent("wf-new", "s", "scored", "camp", "c_new", {"b": 2})
        appended = await audit.append_audit(session, event)
    assert appended.seq == 2
    async with db.read_transaction() as session:
        report = await audit.verify_chain(session)
        assert (report.ok, report.rows, report.head_hash) == (True, 2, appended.hash)
        lines: list[str] = []
        header = await write_export(session, Selection(campaign_id="camp"), lines.append)
        assert header.rows == 2
        lines.clear()
        await write_export(session, Selection(customer_key="c_new"), lines.append)
    # Selected from seq 2: the legacy row lies before the export and is not needed.
    assert verify_export(lines).ok
    async with db.read_transaction() as session:
        lines.clear()
        await write_export(session, Selection(customer_key="c_old"), lines.append)
    assert [json.loads(line).get("seq") for line in lines[1:]] == [1, 2]
    report_file = verify_export(lines)
    assert (report_file.ok, report_file.rows, report_file.evidence) == (True, 1, 1)


def test_why_tells_one_customers_story_and_refuses_a_stranger(data_dir: Path) -> None:
    key = Pseudonymiser.from_settings(Settings(data_dir=data_dir), create=False).customer_key
    run = cohortflow("audit", "why", CUSTOMER, "--data-dir", data_dir)
    assert run.code == 0, run
    header, *lines = run.stdout.splitlines()
    assert header == f"{key(CUSTOMER)}:"
    # The seeded rows carry no payload a teller knows: told as stored, never dropped.
    assert [line.split("Z ", 1)[1] for line in lines] == [
        f'cli_campaign: {kind} {{"note":"{kind} for {key(CUSTOMER)}"}}'
        for kind in ("scored", "approval_requested", "crm_written")
    ]
    as_json = cohortflow("audit", "why", key(CUSTOMER), "--json", "--data-dir", data_dir)
    assert [json.loads(line)["campaign"] for line in as_json.stdout.splitlines()] == [
        "cli_campaign"
    ] * 3
    assert_refused(cohortflow("audit", "why", "nobody-1", "--data-dir", data_dir), "nobody-1")
