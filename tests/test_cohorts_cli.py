"""Cohorts through the HTTP API (real sockets) and the CLI (a subprocess)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx

from cohortflow.events.ingest import Ingestor
from cohortflow.storage import audit
from cohortflow.storage.db import Database
from tests.harness import bearer, issue_token
from tests.test_events import PSEUDONYMISER, T0, _cli, cli_env, serve_api, settings_for, track

RICH = {
    "cohort_id": "rich",
    "name": "Spent at least 100",
    "rule": {"all": [{"feature": "monetary_total", "op": ">=", "value": 100}]},
}


async def test_cohort_api_applies_evaluates_and_pages_members(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    async with serve_api(settings_for(database_url, tmp_path)) as served:
        admin = bearer(await issue_token(db, "tests-admin", "admin", "ingest"))
        async with httpx.AsyncClient(base_url=served.url, timeout=60, headers=admin) as client:
            bad = {**RICH, "rule": {"all": [{"feature": "monetary_total", "op": "~", "value": 1}]}}
            response = await client.post("/v1/cohorts", json=bad)
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["body", "rule.all[0].op"]
            assert (await client.post("/v1/cohorts", json=RICH)).json() == {
                "cohort_id": "rich",
                "version": 1,
                "changed": True,
            }
            assert (await client.post("/v1/cohorts", json=RICH)).json()["changed"] is False
            async with db.transaction() as session:
                rows = await audit.audit_for_workflow(session, "cohort:rich")
            assert [(r.kind, json.loads(r.payload)) for r in rows] == [
                ("cohort_applied", {"by": "tests-admin", "version": 1})
            ]
            assert (await client.get("/v1/cohorts/nope")).status_code == 404
            assert (await client.get("/v1/cohorts/rich")).json()["rule"] == RICH["rule"]

            events = [track(f"m{i}", f"u{i}", amount=60.0 * i, at=T0) for i in range(4)]
            assert (await client.post("/v1/events", json={"batch": events})).status_code == 200
            first = (await client.post("/v1/cohorts/rich/evaluate")).json()
            assert (first["members"], first["entered"], first["exited"]) == (2, 2, 0)
            assert first["temporal"] == "unreachable"  # stored anyway; launched later
            second = (await client.post("/v1/cohorts/rich/evaluate")).json()
            assert (second["entered"], second["exited"]) == (0, 0)

            page = (await client.get("/v1/cohorts/rich/members", params={"limit": 1})).json()
            rest = (
                await client.get("/v1/cohorts/rich/members", params={"after": page["next"]})
            ).json()
            keys = {m["customer_key"] for m in page["members"] + rest["members"]}
            assert keys == {PSEUDONYMISER.customer_key("u2"), PSEUDONYMISER.customer_key("u3")}
            assert rest["next"] is None
            listed = (await client.get("/v1/cohorts")).json()
            assert [(c["cohort_id"], c["members"]) for c in listed] == [("rich", 2)]


async def test_cohort_cli(db: Database, database_url: str, tmp_path: Path) -> None:
    env = cli_env(database_url, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort_id: x\nname: X\nrule: {any: [{feature: recency, op: '>', value: 1}]}\n")
    code, _, err = await _cli(env, "cohort", "apply", str(bad))
    assert code == 2
    assert "rule.any[0].feature: unknown feature 'recency'" in err

    good = tmp_path / "rich.json"
    good.write_text(json.dumps(RICH))
    code, out, err = await _cli(env, "cohort", "apply", str(good))
    assert code == 0, err
    assert out.strip() == "cohort rich v1 stored"

    await Ingestor(db, PSEUDONYMISER).ingest(
        [track(f"m{i}", f"u{i}", amount=150.0, at=T0 + timedelta(hours=i)) for i in range(3)]
    )
    code, out, err = await _cli(env, "cohort", "evaluate", "rich", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["members"], summary["entered"], summary["temporal"]) == (3, 3, "unreachable")
    code, out, _ = await _cli(env, "cohort", "evaluate", "rich", "--json")
    assert json.loads(out.strip().splitlines()[-1])["entered"] == 0

    code, out, _ = await _cli(env, "cohort", "members", "rich", "--limit", "2")
    assert len(out.strip().splitlines()) == 2
    code, _, err = await _cli(env, "cohort", "show", "nope")
    assert code == 2
    assert "no cohort 'nope'" in err
