"""The sandbox CRM: a real HTTP server with its own SQLite store, in one of two modes.

- ``own`` (the default): our HubSpot-v3-like dialect (:mod:`cohortflow.crm.client`), with an
  idempotency key in every write, which it dedupes.
- ``hubspot``: HubSpot's own wire format, as :class:`~cohortflow.crm.hubspot.HubSpotConnector`
  speaks it (:mod:`cohortflow.crm.sandbox.hubspot_routes`): the bearer token required when one
  is configured, HubSpot's 429 body (``policyName``) and ``X-HubSpot-RateLimit-*`` headers and
  no ``Retry-After``, a rolling ten-second limit and an optional daily one, and enrolments that
  are not idempotent (every one applied is counted, so duplicates show).

Tests, demos and ``cohortflow up`` talk to it exactly as they would to a real CRM, and it
misbehaves on demand (rate limits, injected faults, random 503s, latency, replies dropped after
the write, one record of a batch refused; ``POST /_sandbox/faults``). ``GET /_sandbox/stats``
counts requests by route and status, ``/_sandbox/effects`` the effects per contact and sequence
or list, ``/_sandbox/contacts`` the contacts (``hubspot`` mode). Choices a real CRM might make
differently (``own`` mode unless said):

- Enrolling an unknown contact in a sequence, or adding it to a list, is a 404 naming
  ``contact_id``, as a real CRM would answer; the idempotency key is not used up, so the same
  call succeeds once the contact has been upserted.
- The rolling window counts only the requests it admitted, so ``Retry-After`` (the time until
  the oldest of them leaves the window) is a promise: the next request after it gets through.
- Injected faults and error-rate 503s answer before the rate limiter and do not count in it.
- Data, dedupe state and the request log live in SQLite and survive a restart; pending faults
  and the rate-limit window are in memory and do not.
- Without ``token`` there is no authentication: any bearer token is accepted. With one, a
  request without it is a 401 (both modes) that no limit counts.
- ``hubspot`` mode: the daily limit resets at midnight in ``daily_reset_timezone``, as
  HubSpot's does in the account's zone; a contact may be enrolled again while enrolled
  (``already_enrolled="apply"``, the strict default, so duplicates can be counted) or be
  refused as HubSpot documents (``"reject"``: ``ALREADY_ENROLLED``, one sequence at a time).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cohortflow.crm.sandbox.hubspot_routes import (
    HubSpotBackend,
    HubSpotError,
    RecordRejection,
    error_body,
    error_response,
    hubspot_routes,
)
from cohortflow.crm.sandbox.hubspot_store import AlreadyEnrolledPolicy, HubSpotStore
from cohortflow.crm.sandbox.store import (
    ContactNotFound,
    FieldProblem,
    SandboxStore,
    UpsertRecord,
    ValidationFailed,
)

MAX_BATCH = 100
CRM_PREFIX = "/crm/"
SandboxMode = Literal["own", "hubspot"]
RatePolicy = Literal["TEN_SECONDLY_ROLLING", "SECONDLY", "DAILY"]
# The paths each mode serves as a CRM (and gates: latency, faults, limits, the request log).
GATED_PREFIXES: dict[SandboxMode, tuple[str, ...]] = {
    "own": (CRM_PREFIX,),
    "hubspot": (CRM_PREFIX, "/automation/"),
}
_RATE_MESSAGES: dict[str, str] = {
    "TEN_SECONDLY_ROLLING": "You have reached your ten_secondly_rolling limit.",
    "SECONDLY": "You have reached your secondly limit.",
    "DAILY": "You have reached your daily limit.",
}


@dataclass
class SandboxConfig:
    """How the sandbox stores data and how it misbehaves."""

    db_path: Path
    rate_limit: int = 100
    window_seconds: float = 10.0
    error_rate: float = 0.0
    latency_ms: int = 0
    seed: int = 0
    mode: SandboxMode = "own"
    token: str | None = None
    daily_limit: int | None = None
    daily_reset_timezone: str = "UTC"
    already_enrolled: AlreadyEnrolledPolicy = "apply"

    def __post_init__(self) -> None:
        if self.mode not in GATED_PREFIXES:
            raise ValueError(f"mode must be own or hubspot, not {self.mode!r}")
        if self.already_enrolled not in ("apply", "reject"):
            raise ValueError("already_enrolled must be apply or reject")
        if self.daily_limit is not None and self.daily_limit < 1:
            raise ValueError("daily_limit must be at least 1 when set")
        try:
            ZoneInfo(self.daily_reset_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {self.daily_reset_timezone!r}") from exc
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


FaultKind = Literal["status", "latency", "drop", "reject_record"]


class _FaultRequest(BaseModel):
    """The next ``count`` requests under ``path_prefix`` misbehave, by ``kind``:

    - ``status``: answered ``status`` before the rate limiter (and not counted by it); a 429
      carries ``Retry-After`` in ``own`` mode, in ``hubspot`` mode HubSpot's body with
      ``policy`` and no ``Retry-After``; ``retry_after_header`` is sent verbatim in either
      (``"7"``, ``"Wed, 21 Oct 2099 07:28:00 GMT"``).
    - ``latency``: held ``seconds`` first, then handled as usual (a client that gives up
      meanwhile does not stop the write).
    - ``drop``: handled (the write is applied) and the connection then cut with no reply.
    - ``reject_record`` (``hubspot`` mode): the input of a batch upsert whose id is
      ``record_id`` is refused with ``status`` (default 400) and ``message``; the others are
      written (207). ``count`` is how many such inputs.
    """

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind = "status"
    status: int | None = Field(None, ge=400, le=599)
    count: int = Field(1, ge=1)
    retry_after: float = Field(1.0, ge=0, description="Seconds; sent whole, rounded up.")
    retry_after_header: str | None = Field(None, min_length=1)
    policy: RatePolicy | None = None
    seconds: float = Field(0.0, ge=0)
    record_id: str | None = Field(None, min_length=1)
    message: str = "injected fault"
    path_prefix: str = Field(CRM_PREFIX, pattern=r"^/(crm|automation)/")

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.kind == "status" and self.status is None:
            raise ValueError("a status fault needs a status")
        if self.kind == "latency" and self.seconds <= 0:
            raise ValueError("a latency fault needs seconds > 0")
        if self.kind == "reject_record" and self.record_id is None:
            raise ValueError("a reject_record fault needs a record_id")
        return self


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: float
    path_prefix: str
    kind: FaultKind = "status"
    retry_after_header: str | None = None
    policy: RatePolicy | None = None
    seconds: float = 0.0
    record_id: str | None = None
    message: str = "injected fault"

    @classmethod
    def of(cls, request: _FaultRequest) -> _Fault:
        default = 400 if request.kind == "reject_record" else 0
        return cls(
            status=request.status if request.status is not None else default,
            remaining=request.count,
            retry_after=request.retry_after,
            path_prefix=request.path_prefix,
            kind=request.kind,
            retry_after_header=request.retry_after_header,
            policy=request.policy,
            seconds=request.seconds,
            record_id=request.record_id,
            message=request.message,
        )


class _RollingWindow:
    """At most ``limit`` admitted requests in any ``window`` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """Admit a request at ``now``, or return the seconds until one would be admitted."""
        self._expire(now)
        if len(self._admitted) >= self._limit:
            return self._admitted[0] + self._window - now
        self._admitted.append(now)
        return None

    def remaining(self, now: float) -> int:
        """How many more requests the window would admit at ``now``."""
        self._expire(now)
        return max(self._limit - len(self._admitted), 0)

    def _expire(self, now: float) -> None:
        while self._admitted and self._admitted[0] <= now - self._window:
            self._admitted.popleft()


class _DailyWindow:
    """At most ``limit`` admitted requests per calendar day in ``zone`` (reset at midnight)."""

    def __init__(self, limit: int, zone: ZoneInfo) -> None:
        self._limit = limit
        self._zone = zone
        self._day: date | None = None
        self._used = 0

    def spent(self, now: datetime) -> bool:
        self._roll(now)
        return self._used >= self._limit

    def count(self, now: datetime) -> None:
        self._roll(now)
        self._used += 1

    def remaining(self, now: datetime) -> int:
        self._roll(now)
        return max(self._limit - self._used, 0)

    def _roll(self, now: datetime) -> None:
        today = now.astimezone(self._zone).date()
        if today != self._day:
            self._day = today
            self._used = 0


@dataclass
class _Limited:
    """A request the limits refused, and by which policy."""

    policy: RatePolicy
    wait: float
    detail: str = ""
    retry_after_header: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Sandbox:
    """Everything one sandbox app holds: its config, store, faults and rate-limit windows."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.faults: list[_Fault] = []
        self.routes: list[BaseRoute] = []
        self._window = _RollingWindow(config.rate_limit, config.window_seconds)
        self._daily = (
            _DailyWindow(config.daily_limit, ZoneInfo(config.daily_reset_timezone))
            if config.daily_limit is not None
            else None
        )
        self._rng = random.Random(config.seed)
        self._store: SandboxStore | None = None
        self._hubspot: HubSpotStore | None = None

    @property
    def store(self) -> SandboxStore:
        if self._store is None:
            raise RuntimeError("the sandbox store is not open (the app's lifespan has not run)")
        return self._store

    @property
    def hubspot(self) -> HubSpotStore:
        if self._hubspot is None:
            raise RuntimeError("the sandbox is not in hubspot mode, or its store is not open")
        return self._hubspot

    @property
    def hubspot_mode(self) -> bool:
        return self.config.mode == "hubspot"

    async def open(self) -> None:
        self._store = await asyncio.to_thread(SandboxStore, self.config.db_path)
        if self.hubspot_mode:
            self._hubspot = await asyncio.to_thread(HubSpotStore, self._store)

    def close(self) -> None:
        self._hubspot = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def gated(self, path: str) -> bool:
        return path.startswith(GATED_PREFIXES[self.config.mode])

    def authorized(self, scope: Scope) -> bool:
        if not self.config.token:
            return True
        expected = f"Bearer {self.config.token}".encode()
        return any(
            name.lower() == b"authorization" and value == expected
            for name, value in scope.get("headers", [])
        )

    def take_fault(self, path: str, kinds: Sequence[FaultKind]) -> _Fault | None:
        """Use up one of the first pending fault of ``kinds`` matching ``path``."""
        fault = next(
            (f for f in self.faults if f.kind in kinds and path.startswith(f.path_prefix)), None
        )
        if fault is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                self.faults.remove(fault)
        return fault

    def reject_record(self, record_id: str) -> RecordRejection | None:
        """Use up a pending ``reject_record`` fault for ``record_id``."""
        fault = next(
            (f for f in self.faults if f.kind == "reject_record" and f.record_id == record_id),
            None,
        )
        if fault is None:
            return None
        fault.remaining -= 1
        if fault.remaining == 0:
            self.faults.remove(fault)
        return RecordRejection(fault.status, fault.message)

    def refusal(self, path: str) -> JSONResponse | None:
        """The answer that preempts the request at ``path``, or None to let it through."""
        fault = self.take_fault(path, ("status",))
        if fault is not None:
            return self._fault_response(fault)
        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            if self.hubspot_mode:
                return JSONResponse(
                    error_body("INTERNAL_ERROR", "injected random failure (error_rate)"),
                    status_code=503,
                )
            return _error(503, "SERVICE_UNAVAILABLE", "injected random failure (error_rate)")
        limited = self._limit()
        if limited is None:
            return None
        if self.hubspot_mode:
            return _hubspot_rate_limited(limited)
        return _rate_limited(max(1, math.ceil(limited.wait)), limited.detail)

    def rate_headers(self, policy: RatePolicy | None = None) -> dict[str, str]:
        """HubSpot's ``X-HubSpot-RateLimit-*`` headers as of now (``hubspot`` mode)."""
        interval = 1.0 if policy == "SECONDLY" else self.config.window_seconds
        headers = {
            "X-HubSpot-RateLimit-Max": str(self.config.rate_limit),
            "X-HubSpot-RateLimit-Remaining": str(self._window.remaining(time.monotonic())),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(interval * 1000)),
        }
        if self._daily is not None and self.config.daily_limit is not None:
            headers["X-HubSpot-RateLimit-Daily"] = str(self.config.daily_limit)
            headers["X-HubSpot-RateLimit-Daily-Remaining"] = str(
                self._daily.remaining(datetime.now(UTC))
            )
        return headers

    def _limit(self) -> _Limited | None:
        """Admit a request under the daily and the rolling limit, or say which refused it.
        Only admitted requests count in either."""
        now = datetime.now(UTC)
        if self._daily is not None and self._daily.spent(now):
            zone = ZoneInfo(self.config.daily_reset_timezone)
            tomorrow = now.astimezone(zone).date() + timedelta(days=1)
            reset = datetime.combine(tomorrow, datetime.min.time(), tzinfo=zone)
            return _Limited(
                "DAILY",
                (reset - now).total_seconds(),
                f"more than {self.config.daily_limit} requests today",
                headers=self.rate_headers("DAILY"),
            )
        wait = self._window.admit(time.monotonic())
        if wait is not None:
            return _Limited(
                "TEN_SECONDLY_ROLLING",
                wait,
                f"more than {self.config.rate_limit} requests"
                f" in {self.config.window_seconds:g} seconds",
                headers=self.rate_headers(),
            )
        if self._daily is not None:
            self._daily.count(now)
        return None

    def _fault_response(self, fault: _Fault) -> JSONResponse:
        if not self.hubspot_mode:
            return _fault_response(fault)
        if fault.status == 429:
            policy = fault.policy or "TEN_SECONDLY_ROLLING"
            return _hubspot_rate_limited(
                _Limited(
                    policy,
                    fault.retry_after,
                    fault.message,
                    retry_after_header=fault.retry_after_header,
                    headers={
                        **self.rate_headers(policy),
                        "X-HubSpot-RateLimit-Remaining": "0",
                        **(
                            {"X-HubSpot-RateLimit-Daily-Remaining": "0"}
                            if policy == "DAILY" and self._daily is not None
                            else {}
                        ),
                    },
                )
            )
        category = "INTERNAL_ERROR" if fault.status >= 500 else "INJECTED_FAULT"
        headers = {"Retry-After": fault.retry_after_header} if fault.retry_after_header else None
        return JSONResponse(
            error_body(category, fault.message), status_code=fault.status, headers=headers
        )

    def route_of(self, scope: Scope) -> str:
        """The template of the route ``scope`` matches, for counts by operation."""
        partial = ""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", scope["path"]))
            if match == Match.PARTIAL and not partial:
                partial = str(getattr(route, "path", ""))
        return partial or str(scope["path"])


class _CrmGate:
    """ASGI middleware for the CRM paths: authentication, latency, faults, rate limits, the
    ``X-HubSpot-RateLimit-*`` headers (``hubspot`` mode), dropped replies, and the request log.

    The log row is written before the response starts, so a client that has its answer can
    already count the attempt.
    """

    def __init__(self, app: ASGIApp, sandbox: _Sandbox) -> None:
        self._app = app
        self._sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sandbox = self._sandbox
        if scope["type"] != "http" or not sandbox.gated(scope["path"]):
            await self._app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return
        method: str = scope["method"]
        path: str = scope["path"]
        keys = _idempotency_keys(body)
        store = sandbox.store
        route = sandbox.route_of(scope)
        logged = False
        extra_headers: dict[str, str] = {}

        async def log(status: int, dropped: bool = False) -> None:
            await asyncio.to_thread(
                store.log_request, method, path, status, keys, route=route, dropped=dropped
            )

        async def send_logged(message: Message) -> None:
            nonlocal logged
            if message["type"] == "http.response.start" and not logged:
                logged = True
                await log(message["status"])
                if extra_headers:
                    headers = [*message.get("headers", [])]
                    headers += [(k.lower().encode(), v.encode()) for k, v in extra_headers.items()]
                    message = {**message, "headers": headers}
            await send(message)

        if not sandbox.authorized(scope):
            await _unauthorized(sandbox.hubspot_mode)(scope, receive, send_logged)
            return
        if sandbox.config.latency_ms:
            await asyncio.sleep(sandbox.config.latency_ms / 1000)
        spike = sandbox.take_fault(path, ("latency",))
        if spike is not None:
            await asyncio.sleep(spike.seconds)
        refusal = sandbox.refusal(path)
        if refusal is not None:
            await refusal(scope, receive, send_logged)
            return
        if sandbox.hubspot_mode:
            extra_headers.update(sandbox.rate_headers())
        if sandbox.take_fault(path, ("drop",)) is not None:
            status = await _handle_silently(self._app, scope, _replay(body, receive))
            await log(status, dropped=True)
            await _cut_connection(receive)
            return
        try:
            await self._app(scope, _replay(body, receive), send_logged)
        except Exception:
            if not logged:
                await log(500)
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

    # No FastAPI telemetry where a tracer provider is installed: a test double's requests are
    # no part of a campaign's trace, and its wrapped ``receive`` hides the transport that
    # dropping a reply (``_cut_connection``) needs.
    app = FastAPI(
        title=f"cohortflow sandbox CRM ({config.mode} mode)",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(_CrmGate, sandbox=sandbox)
    if sandbox.hubspot_mode:
        backend = HubSpotBackend(
            store=lambda: sandbox.hubspot,
            already_enrolled=config.already_enrolled,
            reject=sandbox.reject_record,
        )
        crm_router = hubspot_routes(backend)
    else:
        crm_router = _crm_routes(sandbox)
    app.include_router(crm_router)
    app.include_router(_sandbox_routes(sandbox))
    # The CRM routes by template, for the request log's counts by operation.
    sandbox.routes = list(crm_router.routes)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "mode": config.mode}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            FieldProblem(_field_path(error), str(error.get("msg", "invalid")))
            for error in exc.errors()
        ]
        if sandbox.hubspot_mode:
            return error_response(
                HubSpotError(
                    400,
                    "VALIDATION_ERROR",
                    "Invalid input: " + "; ".join(f"{p.field}: {p.message}" for p in problems),
                    errors=[{"message": p.message, "in": p.field} for p in problems],
                )
            )
        return _error(422, "VALIDATION_ERROR", "the request is invalid", problems)

    @app.exception_handler(HubSpotError)
    async def hubspot_error(_: Request, exc: HubSpotError) -> JSONResponse:
        return error_response(exc)

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

    @router.delete("/objects/contacts/{contact_id}", status_code=204)
    async def delete_contact(contact_id: str) -> None:
        """Delete a contact and its memberships (204 also when there was none)."""
        await asyncio.to_thread(sandbox.store.delete_contact, contact_id)

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

    @router.delete("/sequences/{sequence_id}/enrollments/{contact_id}")
    async def unenroll(sequence_id: str, contact_id: str) -> dict[str, str]:
        removed = await asyncio.to_thread(
            sandbox.store.remove_membership, "sequence", sequence_id, contact_id
        )
        status = "unenrolled" if removed else "not_enrolled"
        return {"contact_id": contact_id, "sequence_id": sequence_id, "status": status}

    @router.delete("/lists/{list_id}/members/{contact_id}")
    async def remove_member(list_id: str, contact_id: str) -> dict[str, str]:
        removed = await asyncio.to_thread(
            sandbox.store.remove_membership, "list", list_id, contact_id
        )
        status = "removed" if removed else "not_member"
        return {"contact_id": contact_id, "list_id": list_id, "status": status}

    return router


def _sandbox_routes(sandbox: _Sandbox) -> APIRouter:
    router = APIRouter(prefix="/_sandbox")

    @router.post("/faults")
    async def add_fault(fault: _FaultRequest) -> dict[str, list[dict[str, Any]]]:
        sandbox.faults.append(_Fault.of(fault))
        return {"faults": [asdict(f) for f in sandbox.faults]}

    @router.get("/faults")
    async def pending_faults() -> dict[str, list[dict[str, Any]]]:
        return {"faults": [asdict(f) for f in sandbox.faults]}

    @router.delete("/faults")
    async def clear_faults() -> dict[str, list[dict[str, Any]]]:
        sandbox.faults.clear()
        return {"faults": []}

    @router.get("/requests")
    async def logged_requests(idempotency_key: str | None = None) -> dict[str, Any]:
        found = await asyncio.to_thread(sandbox.store.requests, idempotency_key)
        return {"count": len(found), "requests": [asdict(r) for r in found]}

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Requests by (method, route, status), with totals by status: 429s are the rate
        limited ones (injected or not), ``dropped`` the replies cut after the write."""
        counts = await asyncio.to_thread(sandbox.store.request_counts)
        by_status: dict[str, int] = {}
        for c in counts:
            by_status[str(c.status)] = by_status.get(str(c.status), 0) + c.count
        return {
            "mode": sandbox.config.mode,
            "total": sum(c.count for c in counts),
            "rate_limited": by_status.get("429", 0),
            "dropped": sum(c.count for c in counts if c.dropped),
            "by_status": by_status,
            "requests": [asdict(c) for c in counts],
        }

    @router.get("/effects")
    async def effects() -> dict[str, Any]:
        """``hubspot`` mode: every applied enrolment per (contact, sequence) and list
        membership change per (contact, list), with the duplicates among them."""
        if not sandbox.hubspot_mode:
            return {"mode": "own", "enrollments": [], "list_memberships": []}
        return {"mode": "hubspot", **await asyncio.to_thread(sandbox.hubspot.effects)}

    @router.get("/contacts")
    async def contacts(id_property: str | None = None, value: str | None = None) -> dict[str, Any]:
        """``hubspot`` mode: contacts with their properties, unique keys and upsert count."""
        if not sandbox.hubspot_mode:
            return {"mode": "own", "count": 0, "contacts": []}
        found = await asyncio.to_thread(sandbox.hubspot.contacts, id_property, value)
        return {
            "mode": "hubspot",
            "count": len(found),
            "contacts": [
                {
                    "id": str(c.id),
                    "properties": c.properties,
                    "keys": c.keys,
                    "upserts": c.upserts,
                    "created_at": c.created_at,
                    "updated_at": c.updated_at,
                }
                for c in found
            ],
        }

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
        if fault.retry_after_header is not None:
            return _error(
                429, "RATE_LIMITS", fault.message, headers={"Retry-After": fault.retry_after_header}
            )
        return _rate_limited(math.ceil(fault.retry_after), fault.message)
    category = "SERVICE_UNAVAILABLE" if fault.status >= 500 else "INJECTED_FAULT"
    headers = {"Retry-After": fault.retry_after_header} if fault.retry_after_header else None
    return _error(fault.status, category, fault.message, headers=headers)


def _hubspot_rate_limited(limited: _Limited) -> JSONResponse:
    """HubSpot's 429: ``policyName`` in the body and the rate-limit headers, and no
    ``Retry-After`` unless a fault asks for one."""
    headers = dict(limited.headers)
    if limited.retry_after_header is not None:
        headers["Retry-After"] = limited.retry_after_header
    return JSONResponse(
        {
            "status": "error",
            "message": _RATE_MESSAGES[limited.policy],
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": limited.policy,
            "requestId": str(uuid.uuid4()),
        },
        status_code=429,
        headers=headers,
    )


def _unauthorized(hubspot_mode: bool) -> JSONResponse:
    message = (
        "Authentication credentials not found. This API supports OAuth 2.0 authentication;"
        " a private app sends its access token as a bearer token."
    )
    if hubspot_mode:
        return JSONResponse(error_body("INVALID_AUTHENTICATION", message), status_code=401)
    return _error(401, "INVALID_AUTHENTICATION", message)


async def _handle_silently(app: ASGIApp, scope: Scope, receive: Receive) -> int:
    """Run the request through the app (its write is applied) and swallow the reply; the
    status it would have answered, 500 if it raised."""
    status = 500

    async def swallow(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    try:
        await app(scope, receive, swallow)
    except Exception:
        return 500
    return status


async def _cut_connection(receive: Receive) -> None:
    """Close the client's connection with no reply at all (uvicorn: the ``receive`` callable
    is bound to the request cycle, which holds the transport). The server then sees the
    connection lost and sends nothing either."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if abort is None:
        raise RuntimeError("this server does not expose its transport: cannot drop the reply")
    abort()
    for _ in range(3):  # connection_lost runs on a later loop iteration
        await asyncio.sleep(0)
