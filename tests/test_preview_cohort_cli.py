"""`cohortflow campaign preview SPEC --cohort ID` end to end: customers, features and consent
stored in a real database (SQLite and PostgreSQL), the cohort applied and evaluated by the
cohort service, then the preview run as an operator runs it, in a subprocess.

Every expectation is derived from the customers stored below and the spec's rules, never
copied from a run's output.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

from cohortflow.cohorts.service import CohortService
from cohortflow.storage import cohorts, consent, customers
from cohortflow.storage.db import Database
from cohortflow.storage.tables import Base
from tests.harness import FEATURES
from tests.test_events import _cli, cli_env, settings_for

COHORT = "big_spenders"
COHORT_MIN = 100.0  # the cohort holds customers with monetary_total >= this
VIP_MIN = 200.0  # the spec's branch sends monetary_total >= this to the vip label
CAMPAIGN = "preview_cohort_test"
LIST_ID = "standard_winback"
SEQUENCE_ID = "winback"


@dataclass(frozen=True)
class Stored:
    """One stored customer: its spend (a feature) and e-mail marketing consent."""

    key: str
    monetary_total: float
    granted: bool


CUSTOMERS = [
    Stored("c_prev_vip_a", 250.0, True),
    Stored("c_prev_vip_b", 900.0, True),
    Stored("c_prev_std_a", 120.0, True),
    Stored("c_prev_std_b", 199.0, True),
    Stored("c_prev_std_noconsent", 150.0, False),
    # Not members: they would take the standard path if the preview included them.
    Stored("c_prev_small", 60.0, True),
    Stored("c_prev_small_noconsent", 99.0, False),
]

COHORT_DOCUMENT = {
    "cohort_id": COHORT,
    "name": "Spent at least 100",
    "rule": {"all": [{"feature": "monetary_total", "op": ">=", "value": COHORT_MIN}]},
}

VIP_PROPERTIES = {"tier": "vip", "cohort_label": "{cohort}", "campaign": "{campaign}"}


def spec_document(**overrides: Any) -> dict[str, Any]:
    """Score, branch on spend: vip customers get a label, the rest go on a list; both wait an
    hour, then are enrolled in a sequence."""
    document: dict[str, Any] = {
        "campaign_id": CAMPAIGN,
        "name": "Preview by cohort",
        "owner": "crm-team",
        "entry_cohort": COHORT,
        "safe_default_segment": "nurture_default",
        "steps": [
            {"id": "score", "type": "score", "models": ["churn"]},
            {
                "id": "route",
                "type": "branch",
                "rules": [
                    {
                        "all": [{"feature": "monetary_total", "op": ">=", "value": VIP_MIN}],
                        "next": "vip",
                    }
                ],
                "default": "standard",
            },
            {
                "id": "vip",
                "type": "crm",
                "action": "set_properties",
                "properties": VIP_PROPERTIES,
                "next": "pause",
            },
            {"id": "standard", "type": "crm", "action": "add_to_list", "list_id": LIST_ID},
            {"id": "pause", "type": "wait", "duration": "PT1H"},
            {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": SEQUENCE_ID},
        ],
    }
    document.update(overrides)
    return document


@dataclass(frozen=True)
class Expected:
    """What the preview summary should say."""

    customers: int
    paths: Counter[str]
    outcomes: Counter[str]
    writes: Counter[str]


def expected_summary(stored: list[Stored]) -> Expected:
    """The summary the spec's rules give over the cohort's members among ``stored``."""
    members = [c for c in stored if c.monetary_total >= COHORT_MIN]
    vip_write = "set_properties " + ", ".join(
        f"{name}={value}"
        for name, value in sorted(
            {"tier": "vip", "cohort_label": COHORT, "campaign": CAMPAIGN}.items()
        )
    )
    paths: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    for customer in members:
        vip = customer.monetary_total >= VIP_MIN
        label = "vip" if vip else "standard"
        if not customer.granted:  # the first CRM write is refused: the campaign ends there
            paths[f"score > route > {label}"] += 1
            outcomes["consent_blocked"] += 1
            continue
        paths[f"score > route > {label} > pause > enrol"] += 1
        outcomes["completed"] += 1
        writes[vip_write if vip else f"add_to_list list {LIST_ID}"] += 1
        writes[f"enroll_sequence sequence {SEQUENCE_ID}"] += 1
    return Expected(len(members), paths, outcomes, writes)


def parse_summary(stdout: str) -> Expected:
    """The cohort summary printed by `campaign preview --cohort`, parsed strictly."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = lines[0]
    assert header.startswith(f"cohort {COHORT}: ") and header.endswith(" customers"), header
    count = int(header.removeprefix(f"cohort {COHORT}: ").removesuffix(" customers"))
    at = next(i for i, line in enumerate(lines) if line.startswith("outcomes: "))
    paths: Counter[str] = Counter()
    for line in lines[1:at]:
        number, path = line.strip().split("  ", 1)
        paths[path.strip()] = int(number)
    outcomes: Counter[str] = Counter()
    for item in lines[at].removeprefix("outcomes: ").split(", "):
        name, number = item.rsplit(" ", 1)
        outcomes[name] = int(number)
    writes: Counter[str] = Counter()
    for line in lines[at + 1 :]:
        number, write = line.strip().split("  ", 1)
        assert write.startswith("would "), line
        writes[write.removeprefix("would ")] = int(number)
    return Expected(count, paths, outcomes, writes)


async def store(db: Database, stored: list[Stored]) -> None:
    """Customers with the test features (spend overridden) and e-mail marketing consent."""
    async with db.transaction() as session:
        await customers.upsert_customers(
            session,
            [
                customers.CustomerRecord(c.key, f"src-{c.key}", f"{c.key}@example.com")
                for c in stored
            ],
        )
        await customers.upsert_features(
            session,
            [
                (c.key, {**FEATURES, "monetary_total": c.monetary_total}, datetime.now(UTC))
                for c in stored
            ],
        )
        for c in stored:
            await consent.set_consent(session, c.key, "email", "marketing", c.granted, "tests")


async def row_counts(db: Database) -> dict[str, int]:
    """Rows in every table of the schema."""
    counts: dict[str, int] = {}
    async with db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            counts[table.name] = int(
                await session.scalar(select(func.count()).select_from(table)) or 0
            )
    return counts


async def cohort_ready(
    db: Database, database_url: str, tmp_path: Path, registry_root: Path
) -> dict[str, str]:
    """Store the customers, apply and evaluate the cohort; the CLI's environment.

    The cohort goes through the real service (`cohortflow cohort apply|evaluate` run the
    same code; tests/test_cohorts_cli.py drives them), in-process to keep the test fast.
    """
    shutil.copytree(registry_root, tmp_path / "models")  # the data dir's models, for `score`
    await store(db, CUSTOMERS)
    service = CohortService(db, settings_for(database_url, tmp_path), client=None)
    await service.apply(COHORT_DOCUMENT, "tests")
    report = await service.evaluate(COHORT, launch=False)
    members = {c.key for c in CUSTOMERS if c.monetary_total >= COHORT_MIN}
    assert set(report.evaluation.diff.entered) == members
    async with db.transaction() as session:
        assert await cohorts.member_keys(session, COHORT) == members
    return cli_env(database_url, tmp_path)


def write_spec(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


async def test_preview_of_a_cohort_counts_each_path_and_write_and_writes_nothing(
    db: Database, database_url: str, tmp_path: Path, registry_root: Path
) -> None:
    env = await cohort_ready(db, database_url, tmp_path, registry_root)
    spec = write_spec(tmp_path, spec_document())
    before = await row_counts(db)

    code, out, err = await _cli(env, "campaign", "preview", str(spec), "--cohort", COHORT)
    assert code == 0, err
    expected = expected_summary(CUSTOMERS)
    # The data really splits: two paths that complete, one blocked on consent, a non-member.
    assert len(expected.paths) == 3 and expected.outcomes["consent_blocked"] == 1
    assert expected.customers < len(CUSTOMERS)
    assert parse_summary(out) == expected
    assert "note:" not in out  # the model scored every member
    assert not any(c.key in out for c in CUSTOMERS)  # a summary, not a customer listing

    # An unknown cohort: exit code 2 and one line on stderr naming it.
    code, out, err = await _cli(env, "campaign", "preview", str(spec), "--cohort", "no_such")
    assert (code, out) == (2, "")
    problems = [line for line in err.splitlines() if line.strip()]
    assert len(problems) == 1 and "'no_such'" in problems[0], err

    assert await row_counts(db) == before  # a dry run: no campaign, audit, entry or decision


async def test_preview_of_a_cohort_sees_features_only_after_a_score_step(
    db: Database, database_url: str, tmp_path: Path, registry_root: Path
) -> None:
    """As in the workflow, which learns features from its score step: a branch with no
    score step before it knows no feature and takes its default for every member."""
    env = await cohort_ready(db, database_url, tmp_path, registry_root)
    steps = [s for s in spec_document()["steps"] if s["id"] != "score"]
    spec = write_spec(tmp_path, spec_document(steps=steps))

    code, out, err = await _cli(env, "campaign", "preview", str(spec), "--cohort", COHORT)
    assert code == 0, err
    members = [c for c in CUSTOMERS if c.monetary_total >= COHORT_MIN]
    consenting = sum(c.granted for c in members)
    assert parse_summary(out) == Expected(
        len(members),
        Counter(
            {
                "route > standard > pause > enrol": consenting,
                "route > standard": len(members) - consenting,
            }
        ),
        Counter({"completed": consenting, "consent_blocked": len(members) - consenting}),
        Counter(
            {
                f"add_to_list list {LIST_ID}": consenting,
                f"enroll_sequence sequence {SEQUENCE_ID}": consenting,
            }
        ),
    )
