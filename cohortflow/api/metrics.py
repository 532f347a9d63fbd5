"""``GET /metrics`` of the API, open like ``/healthz``: what an SRE alerts on that the API's
database and Temporal's visibility know, read fresh at each scrape in Prometheus's text
format: approvals waiting for an operator and how long the oldest has waited, the signals the
outbox still owes running campaigns and how old the oldest is (the relay's lag), and how many
campaigns are running in each state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select
from temporalio.client import Client
from temporalio.service import RPCError

from cohortflow.api.deps import app_state
from cohortflow.campaigns.visibility import equals, running
from cohortflow.storage import signal_outbox
from cohortflow.storage.tables import Approval
from workflows.campaign.contract import SA, CampaignState

# Terminal states are counted as they happen, by the workers (cohortflow_campaigns_finished).
RUNNING_STATES = [state for state in CampaignState if not state.terminal]


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
        counts = await _running_by_state(await app_state(request).temporal())
        if counts is not None:
            by_state = Gauge(
                "cohortflow_campaigns_running",
                "Running campaigns by state (Temporal visibility).",
                ["state"],
                registry=registry,
            )
            for state, count in counts.items():
                by_state.labels(state=state).set(count)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


async def _running_by_state(client: Client | None) -> dict[str, int] | None:
    """Running campaigns per non-terminal state; None while Temporal cannot answer (no
    series then, rather than zeros an alert would believe)."""
    if client is None:
        return None
    try:
        counted = await asyncio.gather(
            *(client.count_workflows(running(equals(SA.CAMPAIGN_STATE, s))) for s in RUNNING_STATES)
        )
    except RPCError:
        return None
    return {state.value: c.count for state, c in zip(RUNNING_STATES, counted, strict=True)}
