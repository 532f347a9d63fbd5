"""The API fuzzed from its own OpenAPI document with schemathesis, over a real socket and a
real SQLite database, authenticated with a token holding every role.

Every operation of the served document gets a bounded number of generated requests, valid by
the document (positive) and not (negative), with random path ids and with ids of rows seeded
beforehand so requests reach past the 404. Each answer must: not be a 5xx; be text that
encodes (no lone surrogate echoed); conform to the document (status, content type, schema);
name the field of every 400/404/409/413/415/422;
and, when it is a failure, leave every table as it was.

No Temporal runs here, and no request needs one: the seeded approval has expired, so a
decision is refused (409) before Temporal is asked. A decision that does reach an absent
Temporal answers 503 with Retry-After by design (tests/test_api.py), and a bulk decision
first waits 15 s for it to come back, which would make the fuzz slow for nothing.

SQLite only: the check that a failed request wrote nothing snapshots the whole database
after every request, which SQLite's file lets us do in a few milliseconds; PostgreSQL runs the
same code paths in the API tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cohortflow.api.app import create_app
from cohortflow.auth.identity import Role
from cohortflow.auth.tokens import TokenService
from cohortflow.storage import approvals, campaigns, cohorts, customers
from cohortflow.storage.db import Database
from tests.conftest import sqlite_only
from tests.harness import bearer, issue_token, serve_app, spec_document
from tests.test_events import PSEUDONYMISER, settings_for

# Per operation, generation mode and id source: about 900 requests, a minute or less on two
# cores.
EXAMPLES = 15
# Refusals that concern one field must say which; 401/403/429/503 concern the request.
NAMES_A_FIELD = {400, 404, 409, 413, 415, 422}
# Rewritten by the API's signal relay in the background (claims, back-off), not by requests.
CHANGED_BY_THE_RELAY = {"signal_outbox"}
# Not ``negative_data_rejection``: the API is more lenient than its document on purpose in
# places (text is trimmed before its length is checked; Segment's SDKs send numeric ids and
# epoch timestamps). Negative cases are here to reach the parsers with wrong input, and
# these checks and ours judge the answers.
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class Target:
    """The served API, its database file, the fuzzer's token and the ids seeded in it."""

    url: str
    db_path: Path
    headers: dict[str, str]
    seeded: dict[str, str]
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


async def seed(db: Database) -> dict[str, str]:
    """A customer, a campaign with an expired approval, a cohort and a spare token: ids the
    fuzzer's path parameters can name."""
    document = spec_document(campaign_id="fuzzed")
    customer = PSEUDONYMISER.customer_key("fuzz-customer")
    now = datetime.now(UTC)
    async with db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(customer, "fuzz-customer", "f@example.com")]
        )
        await campaigns.save_spec_version(session, "fuzzed", document, created_by="tests")
        await approvals.add_pending(
            session,
            approval_id="fuzz-approval",
            workflow_id=f"campaign:fuzzed:{customer}:1",
            step_id="approve",
            campaign_id="fuzzed",
            customer_key=customer,
            reason="fuzz",
            scores={"churn": 0.9},
            requested_at=now - timedelta(days=4),
            expires_at=now - timedelta(days=1),
        )
        rule = {"feature": "recency_days", "op": ">=", "value": 90}
        await cohorts.save_cohort(
            session, "fuzz_cohort", {"cohort_id": "fuzz_cohort", "name": "F", "rule": rule}
        )
    spare = await TokenService(db).create("spare", ["operator"], lifetime=timedelta(1), by="t")
    return {
        "approval_id": "fuzz-approval",
        "campaign_id": "fuzzed",
        "cohort_id": "fuzz_cohort",
        "token_id": spare.row.token_id,
    }


def snapshot(path: Path) -> dict[str, str]:
    """A digest of every table's rows (the relay's table: its row count)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        digests = {}
        for table in tables:
            if table in CHANGED_BY_THE_RELAY:
                (count,) = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                digests[table] = str(count)
                continue
            digest = hashlib.sha256()
            for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid'):
                digest.update(repr(row).encode("utf-8", "surrogatepass"))
            digests[table] = digest.hexdigest()
        return digests


def strings(value: Any) -> list[str]:
    """Every key and string value in a JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def check_answer(response: Response) -> None:
    """Our own rules for one answer (the document's rules are schemathesis's checks)."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    text = response.content.decode("utf-8")  # strict: the answer is real UTF-8
    if "json" not in "".join(response.headers.get("content-type", [])):
        return
    document = json.loads(text)
    for value in strings(document):
        value.encode("utf-8")  # no lone surrogate arrived as a \ud8xx escape either
    if 400 <= status < 500:
        detail = document["detail"]
        assert isinstance(detail, list) and detail, text
        assert all(isinstance(d["loc"], list) and isinstance(d["msg"], str) for d in detail)
        if status in NAMES_A_FIELD:
            assert any(d["loc"] for d in detail), f"{status} names no field: {text}"


def fuzz(target: Target, operation: APIOperation, cases: st.SearchStrategy[Case]) -> None:
    """Send ``EXAMPLES`` requests drawn from ``cases``; a failure is recorded, not raised,
    so one run reports every operation that fails."""
    before = [snapshot(target.db_path)]
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def send(case: Case) -> None:
        response = case.call(
            base_url=target.url, session=session, headers=target.headers, timeout=30
        )
        target.answers[(operation.label, response.status_code)] += 1
        after = snapshot(target.db_path)
        try:
            check_answer(response)
            case.validate_response(response, checks=SCHEMA_CHECKS, headers=target.headers)
            if response.status_code >= 400:
                changed = sorted(t for t in after if after[t] != before[0].get(t))
                assert not changed, f"a failed request changed {changed}"
        except BaseException as exc:
            body = case.body if not isinstance(case.body, bytes) else case.body[:200]
            target.failures.append(
                f"{operation.label} {case.path_parameters} {case.query} body={body!r}\n"
                f"  -> {response.status_code} {response.text[:300]}\n  {exc}"
            )
            raise
        finally:
            before[0] = after

    with contextlib.suppress(BaseException):
        send()


def run(target: Target, document: dict[str, Any]) -> None:
    """Fuzz every operation of ``document`` in both modes, random and seeded ids."""
    # Our token is sent with every request, so the generator leaves Authorization alone;
    # and query parameters the document does not name are ignored, as by any FastAPI app,
    # so sending them is not invalid input.
    generation = {"with-security-parameters": False, "allow-extra-parameters": False}
    config = SchemathesisConfig.from_dict({"generation": generation})
    schema = schemathesis.openapi.from_dict(document, config=config)
    for result in schema.get_all_operations():
        operation = result.ok()
        ids = {
            p.name: target.seeded[p.name]
            for p in operation.path_parameters
            if p.name in target.seeded
        }
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            make: Callable[..., st.SearchStrategy[Case]] = operation.as_strategy
            fuzz(target, operation, make(generation_mode=mode))
            if ids:
                fuzz(target, operation, make(generation_mode=mode, path_parameters=ids))


@sqlite_only
async def test_the_api_answers_every_generated_request_by_its_document(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    token = await issue_token(db, "fuzzer", *Role)
    seeded = await seed(db)
    settings = settings_for(database_url, tmp_path).model_copy(
        update={"api_rate_burst": 1_000_000, "api_rate_per_second": 1_000_000.0}
    )
    db_path = Path(database_url.removeprefix("sqlite+aiosqlite:///"))
    with serve_app(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            document = (await http.get("/openapi.json")).json()
        target = Target(url, db_path, bearer(token), seeded)
        started = time.monotonic()
        await asyncio.to_thread(run, target, document)
        took = time.monotonic() - started
    sent = sum(target.answers.values())
    by_status = Counter(status for (_, status), n in target.answers.items() for _ in range(n))
    print(f"\nfuzzed {len(document['paths'])} paths: {sent} requests in {took:.1f}s, {by_status}")
    assert not target.failures, "\n\n".join(target.failures[:20])
    # Every documented operation was reached, and the generator got past validation.
    operations = {label for label, _ in target.answers}
    assert len(operations) == sum(len(methods) for methods in document["paths"].values())
    assert by_status[200] > 0 and by_status[422] > 0
