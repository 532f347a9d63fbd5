"""The HTTP API operators and other systems use: approvals, consent, campaign controls."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError

from cohortflow.api.approvals import approvals_router
from cohortflow.api.campaigns import campaigns_router
from cohortflow.api.codec import CodecCors, codec_router
from cohortflow.api.cohorts import cohorts_router
from cohortflow.api.deps import AppState
from cohortflow.api.events import events_router
from cohortflow.api.inbox import inbox_router
from cohortflow.api.metrics import metrics_router
from cohortflow.api.models import models_router
from cohortflow.api.tokens import tokens_router
from cohortflow.errors import OperatorError, RateLimited, Unauthenticated
from cohortflow.settings import Settings

log = structlog.get_logger(__name__)

# Controls name what the operator means ("customer"); requests carry it as "customer_id".
_FIELD_NAMES = {"customer": "customer_id", "campaign": "campaign_id"}


def _loc(request: Request, field: str | None) -> list[str]:
    """Where ``field`` sits in the request, as FastAPI's own 422s say it: path or body."""
    if not field:
        return []
    if field not in request.path_params:
        field = _FIELD_NAMES.get(field, field)
    return ["path" if field in request.path_params else "body", field]


_DESCRIPTION = """
Every route but `/healthz` and `/metrics` needs a bearer token (`Authorization: Bearer
cft_…`) made with `cohortflow token create`; each route lists the roles it admits under
`x-roles`. A token answers 401 when missing, unknown, revoked or expired, 403 when its
roles or scope do not fit, 429 (with `Retry-After`) past its request rate. Whoever decides
an approval is the token's identity: the four-eyes rules (not the owner, author or applier
of the campaign version; `approval.required` distinct approvers) are checked by the
campaign itself.
"""


DATABASE_RETRY_AFTER_SECONDS = 5


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application for ``settings``."""
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        relaying = asyncio.create_task(state.relay.run(stop))
        try:
            yield
        finally:
            stop.set()
            await relaying
            await state.db.dispose()

    # Swagger UI and ReDoc from files shipped in fastapi-offline: /docs works with no internet.
    app = FastAPIOffline(
        title="cohortflow",
        summary="Approvals, consent and campaign controls for segment-triggered CRM campaigns.",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )

    app.state.cohortflow = state

    @app.exception_handler(OperatorError)
    async def _operator_error(request: Request, exc: OperatorError) -> JSONResponse:
        loc = _loc(request, exc.field)
        headers = {}
        if isinstance(exc, Unauthenticated):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return JSONResponse(
            status_code=exc.http_status,
            content={"detail": [{"loc": loc, "msg": exc.message, "type": type(exc).__name__}]},
            headers=headers,
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(OSError)
    async def _database_away(request: Request, exc: Exception) -> JSONResponse:
        # The database is unreachable or locked past its timeout: a fault of ours to wait
        # out, not of the request, so 503 and when to try again, never 500.
        log.warning("database unavailable", path=request.url.path, error=type(exc).__name__)
        message = "the database is unavailable; try again shortly"
        return JSONResponse(
            status_code=503,
            content={"detail": [{"loc": [], "msg": message, "type": "Unavailable"}]},
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers and its database is reachable. Open to all."""
        async with state.db.transaction() as session:
            await session.execute(text("SELECT 1"))
        return {"status": "ok"}

    app.include_router(approvals_router())
    app.include_router(campaigns_router())
    app.include_router(tokens_router())
    app.include_router(inbox_router())
    app.include_router(events_router(state.db, state.pseudonymiser, state.relay))
    app.include_router(cohorts_router(state.db, settings))
    app.include_router(models_router(settings))
    app.include_router(codec_router())
    app.include_router(metrics_router())
    app.add_middleware(CodecCors, origins=settings.codec_origins)
    return app
