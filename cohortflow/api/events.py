"""The events API: our own ``POST /v1/events`` and Segment's HTTP Tracking API.

``/v1/batch``, ``/v1/track``, ``/v1/identify``, ``/v1/page``, ``/v1/screen``, ``/v1/group``
and ``/v1/alias`` take what the Segment and RudderStack SDKs send, authenticated by the write
key (an ``ingest`` token) as basic auth; errors also carry Segment's ``code`` and
``message``, which those SDKs read. All of them validate, store and signal through one
:class:`~cohortflow.events.ingest.Ingestor`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter, ValidationError

from cohortflow.api.auth import guard
from cohortflow.api.schemas import body_schema
from cohortflow.auth import policy
from cohortflow.events.ingest import Ingestor, IngestOutcome
from cohortflow.events.relay import SignalRelay
from cohortflow.events.schema import (
    EVENT_TYPES,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    SEGMENT_BATCH_BYTES,
    AliasEvent,
    GroupEvent,
    IdentifyEvent,
    IncomingEvent,
    TrackEvent,
    ViewEvent,
)
from cohortflow.events.signals import TemporalStatus
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage.db import Database

_SENT_AT: TypeAdapter[datetime] = TypeAdapter(datetime)


class EventResultOut(BaseModel):
    """One event's fate: accepted, duplicate (already stored) or rejected with its errors."""

    index: int
    messageId: str | None  # the request's field name
    status: Literal["accepted", "duplicate", "rejected"]
    errors: list[dict[str, Any]]


class BatchOut(BaseModel):
    """The batch's results; ``temporal`` says whether running campaigns were signalled."""

    success: bool  # Segment's answer: true when at least one event was stored
    accepted: int
    duplicates: int
    rejected: int
    signalled: int
    temporal: TemporalStatus
    results: list[EventResultOut]


class BatchIn(BaseModel):
    """A batch as the routes read it (for the OpenAPI document: the routes parse the body
    themselves, so that each event is accepted or rejected alone)."""

    batch: list[IncomingEvent] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)
    context: dict[str, Any] = Field(
        default_factory=dict, description="Shared by every event; an event's own wins."
    )
    sentAt: AwareDatetime | None = Field(None, description="The sender's clock when sent.")


_MESSAGES: dict[str, type[BaseModel]] = {
    "track": TrackEvent,
    "identify": IdentifyEvent,
    "page": ViewEvent,
    "screen": ViewEvent,
    "group": GroupEvent,
    "alias": AliasEvent,
}


def _message_schema(kind: str) -> dict[str, Any]:
    """One Segment call's message: ``type`` may be left out, and is then the path's."""
    schema = body_schema(_MESSAGES[kind])
    schema["properties"]["type"] = {"const": kind, "type": "string"}
    schema["required"] = [name for name in schema["required"] if name != "type"]
    return schema


class Problem(Exception):
    """A request refused as a whole: its status, the field's path and why."""

    def __init__(self, status: int, loc: list[str | int], msg: str, kind: str) -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, loc, msg, kind

    def response(self) -> JSONResponse:
        """Our ``detail`` shape, plus the ``code`` and ``message`` Segment's SDKs read."""
        where = ".".join(str(p) for p in self.loc)
        return JSONResponse(
            status_code=self.status,
            content={
                "code": self.kind,
                "message": f"{where}: {self.msg}" if where else self.msg,
                "detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind}],
            },
        )


def _reject_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise.
    raise ValueError(f"{name} is not a JSON number")


def _json_media(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON document, gzip-decoded when sent so, at most ``limit`` bytes.

    Only a body declared JSON is read: a web page can send text/plain and form bodies
    across origins without a preflight, carrying a browser's saved credentials."""
    if not _json_media(request.headers.get("content-type", "")):
        raise Problem(
            415, ["header", "content-type"], "must be application/json", "unsupported_media_type"
        )
    body = await request.body()
    if request.headers.get("content-encoding", "").lower() == "gzip":
        inflater = zlib.decompressobj(wbits=31)
        try:
            # Never inflate more than the limit allows: a small bomb must not fill memory.
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise Problem(400, ["body"], f"malformed gzip: {exc}", "gzip_invalid") from exc
    if len(body) > limit:
        raise Problem(413, ["body"], f"larger than {limit} bytes", "too_large")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, ["body"], f"malformed JSON: {exc}", "json_invalid") from exc
    except RecursionError as exc:
        raise Problem(400, ["body"], "nested too deeply", "json_invalid") from exc


def _batch_of(document: Any) -> tuple[list[Any], datetime | None]:
    """The events of a batch body, each with the batch's ``context`` under its own, and the
    batch's ``sentAt``."""
    if not isinstance(document, dict) or not isinstance(document.get("batch"), list):
        raise Problem(422, ["body", "batch"], "must be a list of events", "list_type")
    batch: list[Any] = document["batch"]
    if not batch:
        raise Problem(422, ["body", "batch"], "must not be empty", "too_short")
    if len(batch) > MAX_BATCH_EVENTS:
        raise Problem(413, ["body", "batch"], f"more than {MAX_BATCH_EVENTS} events", "too_long")
    shared = document.get("context")
    if isinstance(shared, dict):
        batch = [
            {**e, "context": {**shared, **(e.get("context") or {})}} if isinstance(e, dict) else e
            for e in batch
        ]
    return batch, _sent_at(document, ["body", "sentAt"])


def _sent_at(document: dict[str, Any], loc: list[str | int]) -> datetime | None:
    if document.get("sentAt") is None:
        return None
    try:
        sent = _SENT_AT.validate_python(document["sentAt"])
    except ValidationError as exc:
        raise Problem(422, loc, "not a date-time", "datetime_parsing") from exc
    if sent.tzinfo is None:
        raise Problem(422, loc, "needs a time zone", "timezone_aware")
    return sent


def _answer(outcome: IngestOutcome, refused_status: int, *, single: bool) -> JSONResponse:
    """Per-event results; ``refused_status`` when none was stored. Error paths start at the
    body: ``["body", "batch", index, ...]``, or ``["body", ...]`` for a single event."""
    payload = BatchOut(
        success=outcome.count("rejected") < len(outcome.results),
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
                errors=[
                    {**e, "loc": ["body", *(e["loc"][2:] if single else e["loc"])]}
                    for e in r.errors
                ],
            )
            for r in outcome.results
        ],
    )
    content = payload.model_dump(mode="json")
    if payload.success:
        return JSONResponse(status_code=200, content=content)
    first = payload.results[0].errors[0]
    where = ".".join(str(p) for p in first["loc"])
    content |= {
        "code": first["type"],
        "message": f"{where}: {first['msg']}",
        "detail": payload.results[0].errors,
    }
    return JSONResponse(status_code=refused_status, content=content)


_STORED = "200 when at least one event was stored or was already; idempotent on `messageId`."


def events_router(db: Database, pseudonymiser: Pseudonymiser, relay: SignalRelay) -> APIRouter:
    """The events API over ``db``; new events' signals go out through ``relay``."""
    router = APIRouter()
    ingestor = Ingestor(db, pseudonymiser, relay)

    async def ingest(
        batch: list[Any], sent_at: datetime | None, refused: int, single: bool
    ) -> JSONResponse:
        outcome = await ingestor.ingest(batch, now=datetime.now(UTC), sent_at=sent_at)
        return _answer(outcome, refused, single=single)

    @router.post(
        "/v1/events",
        response_model=BatchOut,
        tags=["events"],
        **guard(
            policy.INGEST,
            "post events",
            {
                400: "malformed JSON or gzip",
                413: "batch too large",
                415: "not application/json",
                422: "wrong shape, or every event rejected",
            },
            body=body_schema(BatchIn),
        ),
    )
    async def post_events(request: Request) -> Any:
        """Store a batch of events (Segment's batch shape, up to 1,000 events and 4 MB).

        Each event is accepted, a duplicate, or rejected with the path of what is wrong.
        """
        try:
            batch, sent_at = _batch_of(await read_json(request, MAX_BATCH_BYTES))  # our limits
        except Problem as problem:
            return problem.response()
        return await ingest(batch, sent_at, 422, False)

    segment_answers = {
        400: "malformed JSON or gzip, or every event rejected",
        413: "larger than Segment's limits (500 KB a batch, 32 KB an event)",
        415: "not application/json",
        422: "not a batch",
    }

    @router.post(
        "/v1/batch",
        response_model=BatchOut,
        tags=["segment"],
        **guard(
            policy.INGEST, "post events", segment_answers, write_key=True, body=body_schema(BatchIn)
        ),
    )
    async def segment_batch(request: Request) -> Any:
        """Segment's batch call, as its SDKs send it: track, identify, page, screen, group
        and alias messages, up to 500 KB. Each is accepted, a duplicate, or rejected with the
        path of what is wrong; 200 when at least one was stored or was already."""
        try:
            batch, sent_at = _batch_of(await read_json(request, SEGMENT_BATCH_BYTES))
        except Problem as problem:
            return problem.response()
        return await ingest(batch, sent_at, 400, False)

    for kind in EVENT_TYPES:
        router.add_api_route(
            f"/v1/{kind}",
            _single(kind, ingest),
            methods=["POST"],
            response_model=BatchOut,
            tags=["segment"],
            summary=f"Segment {kind} call",
            **guard(
                policy.INGEST,
                "post events",
                segment_answers,
                write_key=True,
                body=_message_schema(kind),
            ),
        )
    return router


Ingest = Callable[[list[Any], datetime | None, int, bool], Awaitable[JSONResponse]]


def _single(kind: str, ingest: Ingest) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The route of one Segment call: its body is one message, its type the path's."""

    async def one(request: Request) -> JSONResponse:
        try:
            document = await read_json(request, MAX_EVENT_BYTES)
            if not isinstance(document, dict):
                raise Problem(422, ["body"], "must be an event object", "dict_type")
            if document.setdefault("type", kind) != kind:
                raise Problem(422, ["body", "type"], f"must be {kind!r} on /v1/{kind}", "literal")
        except Problem as problem:
            return problem.response()
        # The message's own sentAt corrects its clock (``events.schema``).
        return await ingest([document], None, 400, True)

    one.__doc__ = f"One Segment `{kind}` message, up to 32 KB. {_STORED}"
    one.__name__ = f"segment_{kind}"
    return one
