"""``POST /v1/events``: Segment-style batches of ``track`` and ``identify`` events."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from cohortflow.api.auth import guard
from cohortflow.auth import policy
from cohortflow.events.ingest import Ingestor, TemporalSignaller
from cohortflow.events.schema import MAX_BATCH_BYTES, MAX_BATCH_EVENTS
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect


class EventResultOut(BaseModel):
    """One event's fate: accepted, duplicate (already stored) or rejected with its errors."""

    index: int
    messageId: str | None  # the request's field name
    status: Literal["accepted", "duplicate", "rejected"]
    errors: list[dict[str, Any]]


class BatchOut(BaseModel):
    """The batch's results; ``temporal`` says whether running campaigns were signalled."""

    accepted: int
    duplicates: int
    rejected: int
    signalled: int
    temporal: Literal["ok", "unreachable", "skipped"]
    results: list[EventResultOut]


def _problem(status: int, loc: list[str | int], msg: str, kind: str) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"detail": [{"loc": loc, "msg": msg, "type": kind}]}
    )


def _reject_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise.
    raise ValueError(f"{name} is not a JSON number")


def events_router(db: Database, pseudonymiser: Pseudonymiser, settings: Settings) -> APIRouter:
    """The events API over ``db``; signals campaigns on the configured Temporal."""
    router = APIRouter()
    ingestor = Ingestor(
        db, pseudonymiser, TemporalSignaller(lambda: connect(settings, tracing=False))
    )

    @router.post(
        "/v1/events",
        response_model=BatchOut,
        tags=["events"],
        **guard(
            policy.INGEST,
            "post events",
            {
                400: "malformed JSON",
                413: "batch too large",
                422: "wrong shape, or every event rejected",
            },
        ),
    )
    async def post_events(request: Request) -> Any:
        """Store a batch of events; each is accepted, a duplicate, or rejected with reasons.

        Idempotent on ``messageId``. 200 when at least one event was accepted or already
        stored, 422 when every event was rejected; 400 malformed JSON, 413 too large.
        """
        body = await request.body()
        if len(body) > MAX_BATCH_BYTES:
            return _problem(413, ["body"], f"larger than {MAX_BATCH_BYTES} bytes", "too_large")
        try:
            document = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            return _problem(400, ["body"], f"malformed JSON: {exc}", "json_invalid")
        if not isinstance(document, dict) or not isinstance(document.get("batch"), list):
            return _problem(422, ["body", "batch"], "must be a list of events", "list_type")
        extra = sorted(set(document) - {"batch", "sentAt", "context"})
        if extra:
            return _problem(422, ["body", extra[0]], "unknown field", "extra_forbidden")
        batch = document["batch"]
        if not batch:
            return _problem(422, ["body", "batch"], "must not be empty", "too_short")
        if len(batch) > MAX_BATCH_EVENTS:
            return _problem(
                413, ["body", "batch"], f"more than {MAX_BATCH_EVENTS} events", "too_long"
            )
        outcome = await ingestor.ingest(batch)
        payload = BatchOut(
            accepted=outcome.count("accepted"),
            duplicates=outcome.count("duplicate"),
            rejected=outcome.count("rejected"),
            signalled=outcome.signalled,
            temporal=outcome.temporal,
            results=[
                EventResultOut(
                    index=r.index,
                    messageId=r.message_id,
                    status=r.status,
                    errors=[{**e, "loc": ["body", *e["loc"]]} for e in r.errors],
                )
                for r in outcome.results
            ],
        )
        status = 422 if payload.rejected == len(batch) else 200
        return JSONResponse(status_code=status, content=payload.model_dump(mode="json"))

    return router
