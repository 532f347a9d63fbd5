"""The API with its database away: 503 with Retry-After, never 500, for the health check and
for a route whose token must be looked up (PostgreSQL stopped: nothing listens)."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydantic import SecretStr

from cohortflow.api.app import DATABASE_RETRY_AFTER_SECONDS, create_app
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from tests.harness import serve_app

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
