"""The HTTP API operators and other systems use: approvals, consent, campaign controls."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from cohortflow.api.approvals import approvals_router
from cohortflow.api.campaigns import campaigns_router
from cohortflow.api.codec import CodecCors, codec_router
from cohortflow.api.cohorts import cohorts_router
from cohortflow.api.deps import AppState
from cohortflow.api.events import events_router
from cohortflow.api.inbox import inbox_router
from cohortflow.api.metrics import metrics_router
from cohortflow.api.models import models_router
from cohortflow.api.schemas import lift_definitions
from cohortflow.api.tokens import tokens_router
from cohortflow.errors import OperatorError, RateLimited, Unauthenticated, Unavailable
from cohortflow.settings import Settings

log = structlog.get_logger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")
# Controls name what the operator means ("customer"); requests carry it as "customer_id".
_FIELD_NAMES = {"customer": "customer_id", "campaign": "campaign_id"}


def _loc(request: Request, field: str | None) -> list[str]:
    """Where ``field`` sits in the request, as FastAPI's own 422s say it: path, query (always,
    on a GET: it has no body) or body."""
    if not field:
        return []
    if field not in request.path_params:
        field = _FIELD_NAMES.get(field, field)
    if field in request.path_params:
        return ["path", field]
    if request.method == "GET" or field in request.query_params:
        return ["query", field]
    return ["body", field]


def encodable(value: Any) -> Any:
    """``value`` with every lone surrogate (valid in JSON, not in UTF-8) replaced by U+FFFD,
    so an answer that quotes the request can always be sent."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encodable(v) for v in value]
    return value


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
# SQLSTATE classes of a server that is away rather than of a bad statement: connection
# exceptions, operator intervention (shutting down, starting up) and insufficient resources.
_UNAVAILABLE_SQLSTATES = ("08", "57", "53")


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away, locked or out of connections (retry
    later) rather than that a statement is wrong.

    PostgreSQL stopping or starting reaches asyncpg as a plain ``PostgresError`` (SQLSTATE
    57P01, 57P03), which SQLAlchemy wraps as a generic ``DBAPIError``; a pool whose
    connections are all waiting on a slow database times out with ``TimeoutError``.
    """
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout | OSError):
        return True
    if isinstance(exc, DBAPIError):
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        return exc.connection_invalidated or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    return False


# Temporal or a worker away: a restart takes seconds, so the same short wait.
UNAVAILABLE_RETRY_AFTER_SECONDS = 5


def _answer_errors(app: FastAPI) -> None:
    """Every error in one shape, ``{"detail": [{"loc", "msg", "type"}]}``: ours with their
    status, FastAPI's and Starlette's own, and a database that is away as 503."""

    @app.exception_handler(OperatorError)
    async def _operator_error(request: Request, exc: OperatorError) -> JSONResponse:
        loc = _loc(request, exc.field)
        headers = {}
        if isinstance(exc, Unauthenticated):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, Unavailable):
            headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_SECONDS)
        detail = [{"loc": loc, "msg": exc.message, "type": type(exc).__name__}]
        return JSONResponse(
            status_code=exc.http_status, content={"detail": encodable(detail)}, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, which quotes the input: a lone surrogate in it made the
        # answer itself fail to encode (500) instead of naming the field.
        detail = encodable(jsonable_encoder(exc.errors()))
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Raised by FastAPI and Starlette, not by us; answered in our shape. A body that is
        # not text (not UTF-8) is malformed JSON, 422 like any other; otherwise a body too
        # large, or a path the router does not know or a method it does not take.
        status, kind = exc.status_code, "http_error"
        loc = ["body"] if status in (400, 413) else ["path"]
        if status == 400 and exc.__cause__ is not None:
            status, kind = 422, "json_invalid"
        detail = [{"loc": loc, "msg": str(exc.detail), "type": kind}]
        return JSONResponse(status_code=status, content={"detail": detail}, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(OSError)
    async def _database_away(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            raise exc  # a fault of ours: 500, with its traceback in the log
        # The database is unreachable or locked past its timeout: a fault of ours to wait
        # out, not of the request, so 503 and when to try again, never 500.
        log.warning("database unavailable", path=request.url.path, error=type(exc).__name__)
        message = "the database is unavailable; try again shortly"
        return JSONResponse(
            status_code=503,
            content={"detail": [{"loc": [], "msg": message, "type": "Unavailable"}]},
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )


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

    _answer_errors(app)

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

    describe = app.openapi

    def openapi() -> dict[str, Any]:
        # Bodies routes read themselves carry their models' schemas (``api.schemas``).
        return lift_definitions(describe())

    app.openapi = openapi  # type: ignore[method-assign]
    return app
