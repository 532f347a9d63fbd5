"""The API with its database away: 503 with Retry-After, never 500, for the health check and
for a route whose token must be looked up (PostgreSQL stopped: nothing listens), and for a
write while another writer holds SQLite's lock past the busy timeout; nothing half-written,
and the client's retry stored once."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import SecretStr
from sqlalchemy import func, select

from cohortflow.api.app import DATABASE_RETRY_AFTER_SECONDS, create_app
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage.tables import Event as EventRow
from tests.harness import bearer, issue_token, migrated, serve_app

WELL_FORMED = "cft_" + "a" * 12 + "_" + "b" * 43


async def test_a_stopped_database_answers_503_with_retry_after(tmp_path: Path) -> None:
    gone = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/cohortflow"
    settings = Settings(
        data_dir=tmp_path, database_url=gone, pseudonymisation_key=SecretStr("p" * 32)
    )
    with serve_app(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            health = await http.get("/healthz")
            posted = await http.post(
                "/v1/events",
                json={"batch": []},
                headers={"Authorization": f"Bearer {WELL_FORMED}"},
            )
    for answer in (health, posted):
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_SECONDS)
        assert answer.json()["detail"][0]["msg"].startswith("the database is unavailable")


async def test_sqlite_locked_by_another_writer_answers_503_then_takes_the_retry_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    db = await migrated(f"sqlite+aiosqlite:///{path}")
    token = await issue_token(db, "sdk", "ingest")
    settings = Settings(
        data_dir=tmp_path,
        database_url=db.url,
        pseudonymisation_key=SecretStr("p" * 32),
        temporal_port=free_port(),  # nothing listens: signals stay owed
    )
    event = {
        "type": "track", "event": "purchase", "messageId": "locked-1", "userId": "ada",
        "timestamp": datetime.now(UTC).isoformat(), "properties": {"amount": 3.5},
    }  # fmt: skip
    # Another process's writer holds the lock past the busy timeout (30 s).
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with serve_app(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=90, headers=bearer(token)) as http:
                locked = await http.post("/v1/events", json={"batch": [event]})
                locker.rollback()
                retried = await http.post("/v1/events", json={"batch": [event]})
    finally:
        locker.close()
        async with db.transaction() as session:
            stored = await session.scalar(
                select(func.count()).select_from(EventRow).where(EventRow.message_id == "locked-1")
            )
        await db.dispose()
    assert locked.status_code == 503, locked.text
    assert locked.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_SECONDS)
    assert retried.status_code == 200, retried.text
    assert retried.json()["accepted"] == 1
    assert stored == 1
