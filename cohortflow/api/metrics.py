"""``GET /metrics`` of the API, open like ``/healthz``: what an SRE alerts on that the API's
database knows, read fresh at each scrape in Prometheus's text format: approvals waiting for
an operator and how long the oldest has waited, and the signals the outbox still owes
running campaigns and how old the oldest is (the relay's lag)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select

from cohortflow.api.deps import app_state
from cohortflow.storage import signal_outbox
from cohortflow.storage.tables import Approval


def _age(since: datetime | None, now: datetime) -> float:
    if since is None:
        return 0.0
    aware = since if since.tzinfo else since.replace(tzinfo=UTC)
    return max((now - aware).total_seconds(), 0.0)


def metrics_router() -> APIRouter:
    """``/metrics``."""
    router = APIRouter(tags=["health"])

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of the approvals queue and the signal outbox. Open to all."""
        db = app_state(request).db
        now = datetime.now(UTC)
        async with db.read_transaction() as session:
            pending, oldest = (
                await session.execute(
                    select(func.count(), func.min(Approval.requested_at)).where(
                        Approval.status == "pending"
                    )
                )
            ).one()
            owed = await signal_outbox.backlog(session)
        registry = CollectorRegistry()
        figures = (
            ("cohortflow_approvals_pending", "Approvals waiting for an operator.", pending),
            (
                "cohortflow_approval_oldest_wait_seconds",
                "How long the oldest pending approval has waited.",
                _age(oldest, now),
            ),
            ("cohortflow_signals_owed", "Signals the outbox owes running campaigns.", owed.owed),
            (
                "cohortflow_signal_outbox_lag_seconds",
                "Age of the oldest signal still owed (the relay's lag).",
                _age(owed.oldest, now),
            ),
        )
        for name, text, value in figures:
            Gauge(name, text, registry=registry).set(float(value or 0))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
