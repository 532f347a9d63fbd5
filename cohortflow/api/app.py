"""The HTTP API operators and other systems use: approvals, consent, campaign controls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from temporalio.client import Client

from cohortflow.api.cohorts import cohorts_router
from cohortflow.api.events import events_router
from cohortflow.api.models import models_router
from cohortflow.campaigns.controls import Controls
from cohortflow.errors import OperatorError
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect

log = structlog.get_logger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class DecisionIn(_Body):
    """An operator's decision on an approval."""

    decision: Literal["approve", "reject"]
    operator: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=1000)


class ConsentIn(_Body):
    """A consent change for a source customer id."""

    customer_id: str = Field(min_length=1, max_length=200)
    channel: str = Field(min_length=1, max_length=32)
    purpose: str = Field(min_length=1, max_length=64)
    granted: bool
    source: str = Field("api", min_length=1, max_length=64)


class CampaignActionIn(_Body):
    """Who pauses, resumes or cancels a campaign, and why."""

    operator: str = Field(min_length=1, max_length=128)
    reason: str = Field("", max_length=1000)


class ApprovalOut(BaseModel):
    """A pending or decided approval."""

    approval_id: str
    workflow_id: str
    campaign_id: str
    customer_key: str
    reason: str
    scores: dict[str, Any]
    status: str
    requested_at: datetime
    expires_at: datetime
    decided_by: str | None
    decision_reason: str | None


# Controls name what the operator means ("customer"); requests carry it as "customer_id".
_FIELD_NAMES = {"customer": "customer_id", "campaign": "campaign_id"}


def _loc(request: Request, field: str | None) -> list[str]:
    """Where ``field`` sits in the request, as FastAPI's own 422s say it: path or body."""
    if not field:
        return []
    if field not in request.path_params:
        field = _FIELD_NAMES.get(field, field)
    return ["path" if field in request.path_params else "body", field]


class _State:
    """Per-app dependencies; the Temporal client connects lazily so the API starts alone."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.resolved_database_url)
        self.pseudonymiser = Pseudonymiser.from_settings(settings)
        self.client: Client | None = None

    async def controls(self) -> Controls:
        if self.client is None:
            try:
                self.client = await connect(self.settings)
            except RuntimeError as exc:
                log.warning("temporal unreachable", error=str(exc))
        return Controls(self.db, self.settings, self.pseudonymiser, self.client)


async def _controls(request: Request) -> Controls:
    state: _State = request.app.state.cohortflow
    return await state.controls()


# At module level: with postponed annotations FastAPI resolves "Ctl" in the module's globals;
# a local alias inside create_app made every endpoint expect a query parameter "ctl" (422).
Ctl = Annotated[Controls, Depends(_controls)]


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application for ``settings``."""
    state = _State(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await state.db.dispose()

    app = FastAPI(
        title="cohortflow",
        summary="Approvals, consent and campaign controls for segment-triggered CRM campaigns.",
        lifespan=lifespan,
    )

    app.state.cohortflow = state

    @app.exception_handler(OperatorError)
    async def _operator_error(request: Request, exc: OperatorError) -> JSONResponse:
        loc = _loc(request, exc.field)
        return JSONResponse(
            status_code=exc.http_status,
            content={"detail": [{"loc": loc, "msg": exc.message, "type": type(exc).__name__}]},
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers and its database is reachable."""
        async with state.db.transaction() as session:
            await session.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/v1/approvals")
    async def list_approvals(
        ctl: Ctl,
        status: Annotated[
            Literal["pending", "approved", "rejected", "expired", "all"], Query()
        ] = "pending",
    ) -> list[ApprovalOut]:
        """Approvals, newest first."""
        rows = await ctl.list_approvals(None if status == "all" else status)
        return [ApprovalOut.model_validate(r, from_attributes=True) for r in rows]

    @app.post("/v1/approvals/{approval_id}/decision")
    async def decide(approval_id: str, body: DecisionIn, ctl: Ctl) -> dict[str, str]:
        """Approve or reject; 404 unknown id, 409 not pending, 422 bad operator or reason."""
        result = await ctl.decide(
            approval_id,
            approve=body.decision == "approve",
            operator=body.operator,
            reason=body.reason,
        )
        return {"approval_id": result.approval_id, "decision": result.decision}

    @app.post("/v1/consent")
    async def set_consent(body: ConsentIn, ctl: Ctl) -> dict[str, Any]:
        """Grant or revoke consent; running campaigns of the customer are told at once."""
        outcome = await ctl.set_consent(
            body.customer_id,
            channel=body.channel,
            purpose=body.purpose,
            granted=body.granted,
            source=body.source,
        )
        return {
            "customer_key": outcome.customer_key,
            "changed": outcome.changed,
            "signalled_campaigns": outcome.signalled,
        }

    @app.post("/v1/campaigns/{campaign_id}/{action}")
    async def change_campaign(
        campaign_id: str,
        action: Literal["pause", "resume", "cancel"],
        body: CampaignActionIn,
        ctl: Ctl,
    ) -> dict[str, Any]:
        """Pause, resume or cancel a campaign's outbound actions."""
        outcome = await ctl.change_campaign(
            campaign_id, action, operator=body.operator, reason=body.reason
        )
        return {
            "campaign_id": outcome.campaign_id,
            "status": outcome.status,
            "workflows": outcome.workflows,
        }

    app.include_router(events_router(state.db, state.pseudonymiser, settings))
    app.include_router(cohorts_router(state.db, settings))
    app.include_router(models_router(settings))
    return app
