"""``GET /metrics`` of the API: open, and the approvals queue and the outbox's backlog read
fresh from the database at each scrape (the running campaigns by state, read from Temporal, are
tested with the worker's metrics)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic import SecretStr

from cohortflow.api.app import create_app
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage import approvals, signal_outbox
from cohortflow.storage.db import Database
from tests.harness import serve_app
from tests.test_worker_metrics import sample


async def test_metrics_show_the_approval_queue_and_the_outbox_backlog(
    db: Database, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    async with db.transaction() as session:
        for i, waited in enumerate((timedelta(hours=2), timedelta(minutes=5))):
            await approvals.add_pending(
                session, approval_id=f"apr_metrics{i:05d}", workflow_id=f"wf-{i}",
                step_id="approve", campaign_id="c", customer_key=f"c_{i}", reason="r",
                scores={}, requested_at=now - waited, expires_at=now + timedelta(days=1),
            )  # fmt: skip
        owed = signal_outbox.OwedSignal("m-1", "c_0", {"event": "purchase"})
        await signal_outbox.owe(session, [owed], now=now - timedelta(seconds=90))
    settings = Settings(
        data_dir=tmp_path,
        database_url=db.url,
        pseudonymisation_key=SecretStr("p" * 32),
        temporal_port=free_port(),  # nothing answers there
    )
    with serve_app(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answer = await http.get("/metrics")  # no token: open, like /healthz
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert sample(text, "cohortflow_approvals_pending") == 2
    assert 7190 < sample(text, "cohortflow_approval_oldest_wait_seconds") < 7300
    assert sample(text, "cohortflow_signals_owed") == 1
    assert 85 < sample(text, "cohortflow_signal_outbox_lag_seconds") < 300
    # Without Temporal no count of running campaigns is shown, rather than zeros.
    assert "cohortflow_campaigns_running" not in text
