"""The sandbox CRM: a real HTTP server loosely modelled on HubSpot's v3 API.

Tests, demos and ``cohortflow up`` talk to it exactly as they would to a real CRM, and it
misbehaves on demand (rate limits, injected faults, random 503s, latency). Choices a real CRM
might make differently:

- Enrolling an unknown contact in a sequence, or adding it to a list, is a 404 naming
  ``contact_id``, as a real CRM would answer; the idempotency key is not used up, so the same
  call succeeds once the contact has been upserted.
- The rolling window counts only the requests it admitted, so ``Retry-After`` (the time until
  the oldest of them leaves the window) is a promise: the next request after it gets through.
- Injected faults and error-rate 503s answer before the rate limiter and do not count in it.
- Data, dedupe state and the request log live in SQLite and survive a restart; pending faults
  and the rate-limit window are in memory and do not.
- There is no authentication: any bearer token is accepted.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cohortflow.crm.sandbox.store import (
    ContactNotFound,
    FieldProblem,
    SandboxStore,
    UpsertRecord,
    ValidationFailed,
)

MAX_BATCH = 100
CRM_PREFIX = "/crm/"


@dataclass
class SandboxConfig:
    """How the sandbox stores data and how it misbehaves."""

    db_path: Path
    rate_limit: int = 100
    window_seconds: float = 10.0
    error_rate: float = 0.0
    latency_ms: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate_limit < 1:
            raise ValueError("rate_limit must be at least 1")
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must not be negative")


class _UpsertInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    idempotency_key: str = Field(min_length=1)
    properties: dict[str, str] = Field(default_factory=dict)


class _UpsertBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[_UpsertInput] = Field(min_length=1, max_length=MAX_BATCH)


class _MembershipRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contact_id: str = Field(min_length=1)
    idempotency_key: str = Field(min_length=1)


class _FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=400, le=599)
    count: int = Field(1, ge=1)
    retry_after: float = Field(1.0, ge=0, description="Seconds; sent whole, rounded up.")
    path_prefix: str = Field(CRM_PREFIX, pattern=r"^/crm/")


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: float
    path_prefix: str


class _RollingWindow:
    """At most ``limit`` admitted requests in any ``window`` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """Admit a request at ``now``, or return the seconds until one would be admitted."""
        while self._admitted and self._admitted[0] <= now - self._window:
            self._admitted.popleft()
        if len(self._admitted) >= self._limit:
            return self._admitted[0] + self._window - now
        self._admitted.append(now)
        return None


class _Sandbox:
    """Everything one sandbox app holds: its config, store, faults and rate-limit window."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.faults: list[_Fault] = []
        self._window = _RollingWindow(config.rate_limit, config.window_seconds)
        self._rng = random.Random(config.seed)
        self._store: SandboxStore | None = None

    @property
    def store(self) -> SandboxStore:
        if self._store is None:
            raise RuntimeError("the sandbox store is not open (the app's lifespan has not run)")
        return self._store

    async def open(self) -> None:
        self._store = await asyncio.to_thread(SandboxStore, self.config.db_path)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def refusal(self, path: str) -> JSONResponse | None:
        """The answer that preempts the request at ``path``, or None to let it through."""
        fault = next((f for f in self.faults if path.startswith(f.path_prefix)), None)
        if fault is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                self.faults.remove(fault)
            return _fault_response(fault)
        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            return _error(503, "SERVICE_UNAVAILABLE", "injected random failure (error_rate)")
        wait = self._window.admit(time.monotonic())
        if wait is not None:
            return _rate_limited(
                max(1, math.ceil(wait)),
                f"more than {self.config.rate_limit} requests"
                f" in {self.config.window_seconds:g} seconds",
            )
        return None


class _CrmGate:
    """ASGI middleware for ``/crm/``: latency, faults, rate limit, and the request log.

    The log row is written before the response starts, so a client that has its answer can
    already count the attempt.
    """

    def __init__(self, app: ASGIApp, sandbox: _Sandbox) -> None:
        self._app = app
        self._sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CRM_PREFIX):
            await self._app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return
        method: str = scope["method"]
        path: str = scope["path"]
        keys = _idempotency_keys(body)
        store = self._sandbox.store
        logged = False

        async def send_logged(message: Message) -> None:
            nonlocal logged
            if message["type"] == "http.response.start" and not logged:
                logged = True
                await asyncio.to_thread(store.log_request, method, path, message["status"], keys)
            await send(message)

        if self._sandbox.config.latency_ms:
            await asyncio.sleep(self._sandbox.config.latency_ms / 1000)
        refusal = self._sandbox.refusal(path)
        if refusal is not None:
            await refusal(scope, receive, send_logged)
            return
        try:
            await self._app(scope, _replay(body, receive), send_logged)
        except Exception:
            if not logged:
                await asyncio.to_thread(store.log_request, method, path, 500, keys)
            raise


def create_app(config: SandboxConfig) -> FastAPI:
    """The sandbox CRM as an ASGI app; its lifespan opens and closes the SQLite store."""
    sandbox = _Sandbox(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await sandbox.open()
        try:
            yield
        finally:
            sandbox.close()

    app = FastAPI(title="cohortflow sandbox CRM", lifespan=lifespan)
    app.add_middleware(_CrmGate, sandbox=sandbox)
    app.include_router(_crm_routes(sandbox))
    app.include_router(_sandbox_routes(sandbox))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            FieldProblem(_field_path(error), str(error.get("msg", "invalid")))
            for error in exc.errors()
        ]
        return _error(422, "VALIDATION_ERROR", "the request is invalid", problems)

    @app.exception_handler(ValidationFailed)
    async def refused(_: Request, exc: ValidationFailed) -> JSONResponse:
        return _error(422, "VALIDATION_ERROR", "the request is invalid", exc.problems)

    @app.exception_handler(ContactNotFound)
    async def not_found(_: Request, exc: ContactNotFound) -> JSONResponse:
        problem = FieldProblem("contact_id", f"no contact {exc.contact_id!r}")
        return _error(404, "OBJECT_NOT_FOUND", problem.message, [problem])

    return app


def _crm_routes(sandbox: _Sandbox) -> APIRouter:
    router = APIRouter(prefix="/crm/v3")

    @router.post("/objects/contacts/batch/upsert")
    async def upsert_contacts(batch: _UpsertBatch) -> dict[str, list[dict[str, str]]]:
        records = [UpsertRecord(i.id, i.idempotency_key, i.properties) for i in batch.inputs]
        statuses = await asyncio.to_thread(sandbox.store.upsert_contacts, records)
        return {
            "results": [
                {"id": record.contact_id, "status": status}
                for record, status in zip(records, statuses, strict=True)
            ]
        }

    @router.get("/objects/contacts/{contact_id}")
    async def get_contact(contact_id: str) -> dict[str, Any]:
        contact = await asyncio.to_thread(sandbox.store.get_contact, contact_id)
        if contact is None:
            raise ContactNotFound(contact_id)
        return {
            "id": contact.contact_id,
            "properties": contact.properties,
            "sequences": contact.sequences,
            "lists": contact.lists,
        }

    @router.post("/sequences/{sequence_id}/enrollments")
    async def enroll(sequence_id: str, body: _MembershipRequest) -> dict[str, str]:
        status = await asyncio.to_thread(
            sandbox.store.add_membership,
            "sequence",
            sequence_id,
            body.contact_id,
            body.idempotency_key,
        )
        return {"contact_id": body.contact_id, "sequence_id": sequence_id, "status": status}

    @router.post("/lists/{list_id}/members")
    async def add_member(list_id: str, body: _MembershipRequest) -> dict[str, str]:
        status = await asyncio.to_thread(
            sandbox.store.add_membership, "list", list_id, body.contact_id, body.idempotency_key
        )
        return {"contact_id": body.contact_id, "list_id": list_id, "status": status}

    return router


def _sandbox_routes(sandbox: _Sandbox) -> APIRouter:
    router = APIRouter(prefix="/_sandbox")

    @router.post("/faults")
    async def add_fault(fault: _FaultRequest) -> dict[str, list[dict[str, Any]]]:
        sandbox.faults.append(
            _Fault(fault.status, fault.count, fault.retry_after, fault.path_prefix)
        )
        return {"faults": [asdict(f) for f in sandbox.faults]}

    @router.delete("/faults")
    async def clear_faults() -> dict[str, list[dict[str, Any]]]:
        sandbox.faults.clear()
        return {"faults": []}

    @router.get("/requests")
    async def logged_requests(idempotency_key: str | None = None) -> dict[str, Any]:
        found = await asyncio.to_thread(sandbox.store.requests, idempotency_key)
        return {"count": len(found), "requests": [asdict(r) for r in found]}

    return router


def serve(config: SandboxConfig, host: str, port: int) -> None:
    """Serve the sandbox on ``host:port``, blocking until SIGINT or SIGTERM.

    On either signal uvicorn stops accepting, finishes the requests in flight and runs the
    lifespan shutdown (which closes the store), then re-raises the signal so the process
    ends the way that signal asks (``KeyboardInterrupt`` for SIGINT).
    """
    # Access logs would drown `cohortflow up`'s console; GET /_sandbox/requests has them.
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host=host, port=port, access_log=False)
    )
    server.run()


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body to the app, then defers to the client."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _idempotency_keys(body: bytes) -> list[str]:
    """Keys carried by a request body, read leniently: the log records invalid requests too."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    inputs = data.get("inputs")
    items = inputs if isinstance(inputs, list) else [data]
    return [
        item["idempotency_key"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("idempotency_key"), str)
    ]


def _field_path(error: Any) -> str:
    """``("body", "inputs", 0, "id")`` as ``inputs[0].id``; the whole body as ``body``."""
    if error.get("type") == "json_invalid":
        return "body"
    path = ""
    for part in tuple(error.get("loc", ()))[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def _error(
    status: int,
    category: str,
    message: str,
    problems: Sequence[FieldProblem] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error body in one shape: the first problem's field on top, all of them in ``errors``."""
    return JSONResponse(
        {
            "status": "error",
            "category": category,
            "message": message,
            "field": problems[0].field if problems else None,
            "errors": [{"field": p.field, "message": p.message} for p in problems],
        },
        status_code=status,
        headers=headers,
    )


def _rate_limited(retry_after: int, message: str) -> JSONResponse:
    return _error(429, "RATE_LIMITS", message, headers={"Retry-After": str(retry_after)})


def _fault_response(fault: _Fault) -> JSONResponse:
    if fault.status == 429:
        return _rate_limited(math.ceil(fault.retry_after), "injected fault")
    category = "SERVICE_UNAVAILABLE" if fault.status >= 500 else "INJECTED_FAULT"
    return _error(fault.status, category, "injected fault")
