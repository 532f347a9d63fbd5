"""`cohortflow model ...` and `GET /v1/models/drift` on a real registry and database."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cohortflow.api.app import create_app
from cohortflow.cli.main import app
from cohortflow.errors import Forbidden, Invalid, NotFound
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import audit, customers
from cohortflow.storage.db import Database, migrate
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES, rfm_features
from tests.harness import bearer, issue_token

runner = CliRunner()


async def token_for(settings: Settings, name: str, *roles: str) -> str:
    """A token issued in ``settings``' database."""
    db = Database(settings.resolved_database_url)
    try:
        return await issue_token(db, name, *roles)
    finally:
        await db.dispose()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cohortflow")
    # Set up as `cohortflow up` leaves it: promotions go on record in its database.
    Pseudonymiser.from_settings(Settings(data_dir=path))
    asyncio.run(migrate(Settings(data_dir=path).resolved_database_url))
    return path


def as_identity(name: str, *args: str) -> Any:
    """The CLI run as the local identity ``name``."""
    return runner.invoke(
        app, list(args), catch_exceptions=True, env={"COHORTFLOW_LOCAL_IDENTITY": name}
    )


@pytest.fixture(scope="module")
def versions(data_dir: Path) -> tuple[str, str]:
    """Two churn versions trained through the CLI: a champion and an unpromoted one."""
    first = cli("model", "train", "--model", "churn", "--data-dir", str(data_dir), "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["champion"] is True
    assert report["dates"]["test_features"] == "1997-09-30"
    assert report["auroc_diff_vs_bgnbd"]["estimate"] > 0
    assert report["brier_diff_vs_bgnbd"]["high"] < 0

    second = cli("model", "train", "--data-dir", str(data_dir), "--seed", "7", "--no-promote")
    assert second.exit_code == 0, second.output
    assert "not promoted" in second.stdout
    for text in ("1997-04-30", "1998-06-30", "BG/NBD", "RFM heuristic", "95% CI"):
        assert text in second.stdout
    version = second.stdout.split("registered ")[1].split()[0]
    return report["version"], version


def test_train_if_missing_leaves_a_champion_alone(
    data_dir: Path, versions: tuple[str, str]
) -> None:
    before = listed(data_dir)
    again = cli("model", "train", "--if-missing", "--data-dir", str(data_dir))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == f"churn has champion {versions[0]}; nothing trained"
    assert listed(data_dir) == before


def listed(data_dir: Path) -> dict[str, str | None]:
    result = cli("model", "list", "--data-dir", str(data_dir), "--json")
    assert result.exit_code == 0, result.output
    return {row["version"]: row["role"] for row in json.loads(result.stdout)}


def promotions(data_dir: Path) -> list[dict[str, Any]]:
    """The audit trail's model promotions, oldest first."""

    async def read() -> list[dict[str, Any]]:
        db = Database(Settings(data_dir=data_dir).resolved_database_url)
        try:
            async with db.read_transaction() as session:
                rows = await audit.audit_for_workflow(session, "model:churn")
        finally:
            await db.dispose()
        assert {r.kind for r in rows} == {"model_promoted"}
        return [json.loads(r.payload) for r in rows]

    return asyncio.run(read())


def test_list_promote_challenger_compare(data_dir: Path, versions: tuple[str, str]) -> None:
    first, second = versions
    assert listed(data_dir) == {first: "champion", second: None}

    result = as_identity(
        "bob", "model", "promote", second, "--challenger", "--data-dir", str(data_dir)
    )
    assert result.exit_code == 0, result.output
    assert "(by bob)" in result.stdout
    assert listed(data_dir) == {first: "champion", second: "challenger"}

    compared = cli("model", "compare", first, second, "--data-dir", str(data_dir), "--json")
    assert compared.exit_code == 0, compared.output
    payload = json.loads(compared.stdout)
    auroc = payload["metrics"]["auroc"]
    assert auroc["diff"] == pytest.approx(auroc["b"] - auroc["a"])
    assert auroc["a"] != auroc["b"]
    assert payload["same_data"] is True

    table = cli("model", "compare", first, second, "--data-dir", str(data_dir))
    assert "brier" in table.stdout and first in table.stdout

    # Only an admin promotes; an operator is refused and nothing changes.
    refused = runner.invoke(
        app,
        ["model", "promote", second, "--data-dir", str(data_dir)],
        env={"COHORTFLOW_LOCAL_IDENTITY": "olga", "COHORTFLOW_LOCAL_ROLES": '["operator"]'},
    )
    assert isinstance(refused.exception, Forbidden), refused.output
    assert listed(data_dir) == {first: "champion", second: "challenger"}
    result = as_identity("carol", "model", "promote", second, "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert promotions(data_dir) == [
        {"by": "bob", "version": second, "role": "challenger"},
        {"by": "carol", "version": second, "role": "champion"},
    ]
    # Exactly one champion; the promoted challenger no longer shadows.
    assert listed(data_dir) == {first: None, second: "champion"}
    shown = cli("model", "show", second, "--data-dir", str(data_dir))
    assert "promoted by carol" in shown.stdout
    assert "train features through 1997-04-30" in shown.stdout

    missing = cli("model", "show", "churn-v9-deadbeef", "--data-dir", str(data_dir))
    assert isinstance(missing.exception, NotFound)


async def store_features(settings: Settings, frame: pd.DataFrame) -> None:
    await migrate(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    keys = [f"c_{i:038d}" for i in range(len(frame))]
    rows = [
        {k: None if pd.isna(v) else float(v) for k, v in r.items()}
        for r in frame.loc[:, list(FEATURE_NAMES)].to_dict("records")
    ]
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            await customers.upsert_customers(
                session, [customers.CustomerRecord(k, k, None) for k in keys]
            )
            await customers.upsert_features(
                session, [(k, r, now) for k, r in zip(keys, rows, strict=True)]
            )
    finally:
        await db.dispose()


def test_drift_cli_and_api_flag_a_shifted_store(
    tmp_path: Path, data_dir: Path, versions: tuple[str, str]
) -> None:
    settings = Settings(data_dir=tmp_path / "store", models_dir=data_dir / "models")
    sample = rfm_features(load_transactions(), date(1997, 9, 30)).sample(3000, random_state=1)
    asyncio.run(store_features(settings, sample))
    env = {"COHORTFLOW_MODELS_DIR": str(settings.resolved_models_dir)}

    calm = runner.invoke(
        app, ["model", "drift", "--data-dir", str(settings.data_dir), "--json"], env=env
    )
    assert calm.exit_code == 0, calm.output
    assert json.loads(calm.stdout)["flagged"] == []

    shifted = sample.copy()
    shifted["recency_days"] += 180
    shifted["age_days"] += 180
    asyncio.run(store_features(settings, shifted))
    table = runner.invoke(app, ["model", "drift", "--data-dir", str(settings.data_dir)], env=env)
    assert table.exit_code == 0, table.output
    assert "DRIFT" in table.stdout and "recency_days" in table.stdout

    token = asyncio.run(token_for(settings, "tests-operator", "operator"))
    with TestClient(create_app(settings), headers=bearer(token)) as client:
        response = client.get("/v1/models/drift", params={"model": "churn"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert {"recency_days", "age_days", "score"} <= set(body["flagged"])
        assert "cds_total" not in body["flagged"]
        assert body["n_current"] == 3000
        assert client.get("/v1/models/drift", params={"model": "propensity"}).status_code == 404
        models = client.get("/v1/models").json()
        assert sum(m["champion"] for m in models) == 1


def test_train_on_another_split_and_a_malformed_one_is_refused_by_name(tmp_path: Path) -> None:
    split = "1997-07-31,1997-12-31,1998-06-30"
    trained = cli(
        "model", "train", "--split", split, "--no-promote", "--json", "--data-dir", str(tmp_path)
    )
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.stdout.strip().splitlines()[-1])
    assert (report["dates"]["train_features"], report["dates"]["test_labels_to"]) == (
        "1997-07-31",
        "1998-06-30",
    )
    assert report["champion"] is False
    for bad in ("1997-07-31,1997-12-31", "1997-12-31,1997-07-31,1998-06-30", "x,y,z"):
        # The CLI's entry point prints an operator error as one line and exits 2.
        refused = cli("model", "train", "--split", bad, "--data-dir", str(tmp_path))
        assert isinstance(refused.exception, Invalid), refused.output
        assert refused.exception.field == "split"
        assert refused.exception.message.startswith("split: ")
