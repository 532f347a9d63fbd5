"""The ``cohortflow`` command run as a real subprocess against a prepared data directory.

The data dir is set up through the real code paths (migrations, the generated key file) and
seeded through the storage functions. Every bad input must be one line on stderr naming the
problem, exit code 2, nothing on stdout and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
import typer

from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage import approvals, audit, campaigns, consent, customers
from cohortflow.storage.db import Database, migrate
from tests.harness import FEATURES, spec_document

REPO = Path(__file__).resolve().parents[1]
CUSTOMER = "00042"
OTHER = "00777"
CAMPAIGN = "cli_campaign"
DECIDED = "apr_decided00001"
EXPIRED = "apr_expired00001"
PENDING = "apr_pending00001"


@dataclass(frozen=True)
class Run:
    """One finished ``cohortflow`` process."""

    code: int
    stdout: str
    stderr: str


def cli_env(temporal_port: int | None = None) -> dict[str, str]:
    """Our environment without any COHORTFLOW_ setting, Temporal pointed at a dead port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    # Never the default 7233: another run's server may listen there. Nothing listens here.
    env["COHORTFLOW_TEMPORAL_PORT"] = str(temporal_port or free_port())
    env["COLUMNS"] = "250"
    env["PYTHONPATH"] = str(REPO)
    return env


def cohortflow(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Run:
    """Run ``python -m cohortflow ARGS`` and capture everything."""
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env() if env is None else env,
        cwd=cwd,
        timeout=120,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def snapshot(data_dir: Path) -> dict[str, Any]:
    """Every row of every table, and the key file: what a refused command must not change."""
    files = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.suffix in ("", ".key")}
    with sqlite3.connect(data_dir / "cohortflow.db") as connection:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        rows = {t: sorted(map(repr, connection.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    connection.close()
    return {"files": files, "rows": rows}


async def prepare(data_dir: Path) -> Pseudonymiser:
    """A data dir as `cohortflow up` leaves it, seeded with customers, approvals and audit."""
    settings = Settings(data_dir=data_dir)
    pseudonymiser = Pseudonymiser.from_settings(settings)  # generates the key file
    await migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    now = datetime.now(UTC)
    key, other = pseudonymiser.customer_key(CUSTOMER), pseudonymiser.customer_key(OTHER)
    try:
        async with db.transaction() as session:
            await customers.upsert_customers(
                session,
                [
                    customers.CustomerRecord(key, CUSTOMER, "c42@example.com"),
                    customers.CustomerRecord(other, OTHER, "c777@example.com"),
                ],
            )
            await customers.upsert_features(session, [(key, dict(FEATURES), now)])
            await consent.set_consent(session, key, "email", "marketing", True, "tests")
            spec = CampaignSpec.model_validate(spec_document(campaign_id=CAMPAIGN))
            await campaigns.save_spec_version(
                session, CAMPAIGN, spec.model_dump(mode="json"), created_by="tests"
            )
            for approval_id, expires in (
                (DECIDED, now + timedelta(days=3)),
                (EXPIRED, now - timedelta(hours=1)),
                (PENDING, now + timedelta(days=3)),
            ):
                await approvals.add_pending(
                    session,
                    approval_id=approval_id,
                    workflow_id=f"campaign:{CAMPAIGN}:{key}:{approval_id}",
                    step_id="approve",
                    campaign_id=CAMPAIGN,
                    customer_key=key,
                    reason="high value",
                    scores={"churn": 0.9},
                    requested_at=now - timedelta(days=1),
                    expires_at=expires,
                )
            await approvals.mark_decided(
                session, DECIDED, status="approved", operator="alice", reason="ok", decided_at=now
            )
            for customer_key, workflow, kind in (
                (key, f"campaign:{CAMPAIGN}:{key}:1", "scored"),
                (key, f"campaign:{CAMPAIGN}:{key}:1", "approval_requested"),
                (other, f"campaign:{CAMPAIGN}:{other}:1", "scored"),
                (key, f"campaign:{CAMPAIGN}:{key}:1", "crm_written"),
            ):
                await audit.append_audit(
                    session,
                    audit.AuditEvent(
                        workflow_id=workflow,
                        step_id="score" if kind == "scored" else "label",
                        kind=kind,
                        campaign_id=CAMPAIGN,
                        customer_key=customer_key,
                        payload={"note": f"{kind} for {customer_key}"},
                    ),
                )
    finally:
        await db.dispose()
    return pseudonymiser


@pytest.fixture(scope="module")
async def data_dir(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A prepared data dir the error tests share (they must leave it as it was)."""
    path = tmp_path_factory.mktemp("cli") / "data"
    await prepare(path)
    yield path


@pytest.fixture
def fresh_dir(tmp_path: Path, data_dir: Path) -> Iterator[Path]:
    """A private copy of the prepared data dir, for tests that change it."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    yield copy


def assert_refused(run: Run, *needles: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr containing every needle."""
    assert run.code == 2, run
    assert run.stdout == "", run
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------- help


def command_paths() -> list[list[str]]:
    """Every command and group of the CLI, from the app itself (new commands included)."""
    from cohortflow.cli.main import app

    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        # typer vendors its own click, so go by shape rather than by class.
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_help_of_every_command_exits_0() -> None:
    paths = command_paths()
    assert ["approve"] in paths and ["audit", "verify"] in paths and ["up"] in paths
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = list(pool.map(lambda p: cohortflow(*p, "--help"), paths))
    for path, run in zip(paths, runs, strict=True):
        assert run.code == 0, (path, run)
        assert "Usage:" in run.stdout, (path, run.stdout)
        assert run.stderr == "", (path, run.stderr)
    top = runs[paths.index([])].stdout
    for name in ("up", "demo", "approve", "approvals", "consent", "audit", "campaign"):
        assert name in top


# ---------------------------------------------------------------------- bad input


BAD_INPUT = [
    pytest.param(
        ["approve", "apr_000000000000", "--reason", "x"],
        ["approval_id", "apr_000000000000"],
        id="unknown-approval",
    ),
    pytest.param(
        ["approve", DECIDED, "--reason", "x"],
        [DECIDED, "already approved"],
        id="approve-decided",
    ),
    pytest.param(
        ["reject", DECIDED, "--reason", "x"],
        [DECIDED, "already approved"],
        id="reject-decided",
    ),
    pytest.param(
        ["approve", EXPIRED, "--reason", "x"],
        [EXPIRED, "expired"],
        id="approve-expired",
    ),
    pytest.param(["approve", PENDING], ["--reason"], id="missing-reason"),
    pytest.param(
        ["approve", PENDING, "--reason", "x"],
        ["Temporal is not reachable"],
        id="temporal-unreachable",
    ),
    pytest.param(["approve", PENDING, "--reason", " "], ["reason"], id="blank-reason"),
    pytest.param(
        ["approve", PENDING, "--operator", "bob", "--reason", "x"],
        ["--operator"],
        id="no-operator-option",
    ),
    pytest.param(
        ["approvals", "list", "--campaign", "nope"],
        ["campaign_id", "nope"],
        id="unknown-campaign-filter",
    ),
    pytest.param(["approvals", "list", "--status", "maybe"], ["status", "maybe"], id="bad-status"),
    pytest.param(
        ["consent", "revoke", "nobody-1", "--channel", "email", "--purpose", "marketing"],
        ["customer", "nobody-1"],
        id="unknown-customer",
    ),
    pytest.param(
        ["consent", "revoke", CUSTOMER, "--purpose", "marketing"], ["--channel"], id="no-channel"
    ),
    pytest.param(
        ["campaign", "pause", "no_such_campaign"],
        ["no_such_campaign"],
        id="unknown-campaign",
    ),
    pytest.param(["audit", "show"], ["--customer"], id="show-without-customer"),
]


@pytest.mark.parametrize(("args", "needles"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    data_dir: Path, args: list[str], needles: list[str]
) -> None:
    before = snapshot(data_dir)
    run = cohortflow(*args, "--data-dir", data_dir)
    assert_refused(run, *needles)
    assert snapshot(data_dir) == before


def test_malformed_option_of_demo_and_up_creates_nothing(tmp_path: Path) -> None:
    never = tmp_path / "never"
    assert_refused(cohortflow("demo", "--customers", "abc", "--data-dir", never), "--customers")
    assert_refused(cohortflow("demo", "--customers", "0", "--data-dir", never), "--customers")
    bad_zone = cohortflow("demo", "--timezone", "Mars/Olympus", "--data-dir", never)
    assert_refused(bad_zone, "--timezone", "'Mars/Olympus' is not an IANA time zone name")
    assert_refused(cohortflow("demo", "--signups", "0", "--data-dir", never), "--signups")
    assert_refused(cohortflow("up", "--api-port", "70000", "--data-dir", never), "api_port")
    assert not never.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "taken", "setting"),
    [
        ("up", "--temporal-port", "COHORTFLOW_TEMPORAL_PORT"),
        ("up", "--ui-port", "COHORTFLOW_TEMPORAL_UI_PORT"),
        ("demo", "--api-port", "COHORTFLOW_API_PORT"),
        ("demo", "--crm-port", "COHORTFLOW_CRM_SANDBOX_PORT"),
    ],
)
def test_a_taken_port_is_one_line_naming_it_and_creates_nothing(
    tmp_path: Path, command: str, taken: str, setting: str
) -> None:
    never = tmp_path / "never"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        options = {o: str(free_port()) for o in ("--temporal-port", "--ui-port", "--api-port")}
        options |= {"--crm-port": str(free_port()), taken: str(port)}
        run = cohortflow(command, "--data-dir", never, *chain(*options.items()), cwd=tmp_path)
    assert_refused(run, f"127.0.0.1:{port}", setting)
    assert list(tmp_path.iterdir()) == []


SAFE_PRODUCTION = {
    "COHORTFLOW_ENVIRONMENT": "production",
    "COHORTFLOW_PSEUDONYMISATION_KEY": "0123456789abcdef0123456789abcdef",
    "COHORTFLOW_PAYLOAD_KEYS": '{"k1": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}',
    "COHORTFLOW_CRM_TOKEN": "crm-token",
    "COHORTFLOW_CRM_URL": "https://crm.example.com",
}


@pytest.mark.parametrize(
    ("command", "variable", "value", "needle"),
    [
        ("worker", "COHORTFLOW_PSEUDONYMISATION_KEY", None, "must be set"),
        ("worker", "COHORTFLOW_PAYLOAD_KEYS", None, "must be set"),
        ("api", "COHORTFLOW_CRM_TOKEN", None, "must be set"),
        ("up", "COHORTFLOW_CRM_URL", None, "must be set"),
        (
            "demo",
            "COHORTFLOW_CRM_URL",
            "http://127.0.0.1:8100",
            "must not be the sandbox CRM http://127.0.0.1:8100",
        ),
    ],
)
def test_production_refuses_an_unsafe_default_in_one_line_and_creates_nothing(
    tmp_path: Path, command: str, variable: str, value: str | None, needle: str
) -> None:
    env = cli_env() | SAFE_PRODUCTION
    if value is None:
        del env[variable]
    else:
        env[variable] = value
    run = cohortflow(command, "--data-dir", tmp_path / "never", env=env, cwd=tmp_path)
    assert_refused(run, f"{variable} {needle} when COHORTFLOW_ENVIRONMENT=production")
    assert list(tmp_path.iterdir()) == []


def test_production_jobs_that_neither_write_to_the_crm_nor_make_keys_run(tmp_path: Path) -> None:
    env = cli_env() | {"COHORTFLOW_ENVIRONMENT": "production"}
    run = cohortflow("db", "upgrade", "--data-dir", tmp_path / "data", env=env)
    assert run.code == 0, run
    assert (tmp_path / "data" / "cohortflow.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["approvals", "list"],
        ["approve", "apr_000000000000", "--reason", "x"],
        ["consent", "revoke", CUSTOMER, "--channel", "email", "--purpose", "marketing"],
        ["audit", "verify"],
        ["audit", "show", "--customer", CUSTOMER],
        ["campaign", "pause", CAMPAIGN],
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_operator_commands_on_a_data_dir_never_set_up(tmp_path: Path, args: list[str]) -> None:
    never = tmp_path / "never"
    run = cohortflow(*args, "--data-dir", never, cwd=tmp_path)
    assert_refused(run, "cohortflow up")
    assert not never.exists()
    assert list(tmp_path.iterdir()) == []  # nor a default ./.cohortflow


def test_operator_commands_with_a_schema_but_no_key_file(fresh_dir: Path) -> None:
    (fresh_dir / "pseudonymisation.key").unlink()
    before = snapshot(fresh_dir)
    run = cohortflow("consent", "revoke", CUSTOMER, "--channel", "email", "--purpose", "m",
                     "--data-dir", fresh_dir)  # fmt: skip
    assert_refused(run, "pseudonymisation key")
    assert snapshot(fresh_dir) == before
    assert not (fresh_dir / "pseudonymisation.key").exists()


def test_operator_commands_reach_the_stack_up_recorded_in_the_data_dir(fresh_dir: Path) -> None:
    # `cohortflow up --temporal-port P` records P; commands given only --data-dir use it.
    port = free_port()
    stack = {"temporal_host": "127.0.0.1", "temporal_port": port}
    (fresh_dir / "stack.json").write_text(json.dumps(stack))
    env = {k: v for k, v in cli_env().items() if k != "COHORTFLOW_TEMPORAL_PORT"}
    args: list[str | Path] = [
        "approve",
        PENDING,
        "--reason",
        "x",
        "--data-dir",
        fresh_dir,
    ]
    assert_refused(cohortflow(*args, env=env), f"not reachable at 127.0.0.1:{port}")
    # The environment (or an option) still wins over the file.
    other = free_port()
    assert_refused(cohortflow(*args, env=cli_env(other)), f"not reachable at 127.0.0.1:{other}")


# ---------------------------------------------------------------------- audit


def test_audit_verify_passes_then_names_the_tampered_row(fresh_dir: Path) -> None:
    good = cohortflow("audit", "verify", "--data-dir", fresh_dir)
    assert good.code == 0, good
    assert good.stdout.strip() == "audit chain ok: 4 rows"

    with sqlite3.connect(fresh_dir / "cohortflow.db") as connection:
        # The append-only guard first: only someone with DDL rights gets this far.
        connection.execute("DROP TRIGGER audit_log_no_update")
        connection.execute('UPDATE audit_log SET payload = \'{"note":"forged"}\' WHERE seq = 3')
    connection.close()

    bad = cohortflow("audit", "verify", "--data-dir", fresh_dir)
    assert bad.code == 1, bad
    assert bad.stdout == ""
    assert "seq 3" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_audit_show_prints_only_that_customers_rows(data_dir: Path) -> None:
    key = Pseudonymiser.from_settings(Settings(data_dir=data_dir), create=False).customer_key
    run = cohortflow("audit", "show", "--customer", CUSTOMER, "--data-dir", data_dir)
    assert run.code == 0, run
    assert key(CUSTOMER) in run.stdout
    for kind in ("scored", "approval_requested", "crm_written"):
        assert kind in run.stdout
    assert f"scored for {key(CUSTOMER)}" in run.stdout.replace("\n", "")
    assert key(OTHER) not in run.stdout

    # The key, as every operator screen shows it, finds the same trail.
    by_key = cohortflow("audit", "show", "--customer", key(CUSTOMER), "--data-dir", data_dir)
    assert (by_key.code, by_key.stdout) == (0, run.stdout)

    nobody = cohortflow("audit", "show", "--customer", "nobody-1", "--data-dir", data_dir)
    assert_refused(nobody, "no customer 'nobody-1'")


def test_consent_history_shows_every_decision_with_its_evidence(fresh_dir: Path) -> None:
    key = Pseudonymiser.from_settings(Settings(data_dir=fresh_dir), create=False).customer_key
    args = ("--channel", "email", "--purpose", "marketing", "--data-dir", fresh_dir)
    env = {**cli_env(), "COHORTFLOW_LOCAL_IDENTITY": "carol"}
    for policy_version in ("privacy-v3", "privacy-v3"):  # the second changes nothing
        run = cohortflow(
            "consent", "revoke", CUSTOMER, *args, "--policy-version", policy_version, env=env
        )
        assert run.code == 0, run
    run = cohortflow("consent", "history", key(CUSTOMER), "--json", "--data-dir", fresh_dir)
    assert run.code == 0, run
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    seen = [(r["granted"], r["changed"], r["how"], r["by"], r["policy_version"]) for r in rows]
    assert seen == [
        (True, True, "system", "cohortflow", None),  # stored by the test's setup
        (False, True, "cli", "carol", "privacy-v3"),
        (False, False, "cli", "carol", "privacy-v3"),
    ]
    text = cohortflow("consent", "history", CUSTOMER, "--data-dir", fresh_dir)
    assert "email/marketing revoked via cli by carol, source cli, policy privacy-v3" in text.stdout
    nobody = cohortflow("consent", "history", "nobody-1", "--data-dir", fresh_dir)
    assert_refused(nobody, "no customer 'nobody-1'")


def test_an_anchor_finds_rows_cut_from_the_tail_of_the_chain(fresh_dir: Path) -> None:
    anchors = fresh_dir / "anchors.jsonl"
    run = cohortflow("audit", "anchor", "--file", anchors, "--data-dir", fresh_dir)
    assert run.code == 0, run
    assert run.stdout.startswith("anchored seq 4 ")
    assert "audit anchored" in run.stderr and "seq=4" in run.stderr  # the log's copy
    ok = cohortflow("audit", "verify", "--anchor", anchors, "--data-dir", fresh_dir)
    assert ok.code == 0, ok
    assert "audit chain ok: 4 rows; reaches its anchor" in ok.stdout

    with sqlite3.connect(fresh_dir / "cohortflow.db") as connection:
        # Cut the last row: what is left still chains, so only the anchor can tell.
        connection.execute("DROP TRIGGER audit_log_no_delete")
        connection.execute("DELETE FROM audit_log WHERE seq = 4")
    connection.close()
    assert cohortflow("audit", "verify", "--data-dir", fresh_dir).code == 0
    cut = cohortflow("audit", "verify", "--anchor", anchors, "--data-dir", fresh_dir)
    assert cut.code == 1, cut
    assert "ends at seq 3 but was anchored at seq 4" in cut.stderr
    assert len(cut.stderr.splitlines()) == 1

    anchors.write_text("not an anchor\n")
    bad = cohortflow("audit", "verify", "--anchor", anchors, "--data-dir", fresh_dir)
    assert_refused(bad, "anchor: not an anchor")
