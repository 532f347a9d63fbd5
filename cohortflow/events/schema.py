"""What an incoming event must look like: Segment's HTTP Tracking API messages.

``track``, ``identify``, ``page``, ``screen``, ``group`` and ``alias``, as the Segment and
RudderStack SDKs send them. Each event is validated alone, so one bad event is rejected with
its field paths while the rest of its batch is kept. Fields we do not read are kept in the
stored event's ``raw`` (except ``integrations``, which is only routing for Segment's own
destinations, and the write key); what is refused names the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_BATCH_EVENTS = 1_000
MAX_BATCH_BYTES = 4 * 1024 * 1024  # our own /v1/events
SEGMENT_BATCH_BYTES = 500 * 1024  # Segment's documented limits: a batch request, one event
MAX_EVENT_BYTES = 32 * 1024
MAX_NESTING = 32  # levels of objects and lists in one event
MAX_AMOUNT = 1e12  # an amount or quantity beyond any real order is a bug upstream
MAX_PROPERTIES_BYTES = MAX_EVENT_BYTES
# Clocks drift: a timestamp slightly ahead of ours is plausible, a day ahead is not.
MAX_CLOCK_SKEW = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CONTACT_TRAITS = frozenset({"email", "timezone"})
EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
# Top-level fields the models read; everything else an event carries goes to ``raw``.
_READ = frozenset(
    {"type", "messageId", "userId", "anonymousId", "timestamp", "sentAt", "event"}
    | {"properties", "traits", "name", "category", "groupId", "previousId"}
)
# Never stored: routing for Segment's destinations, and a write key sent in the body.
_DROPPED = frozenset({"integrations", "writeKey"})
# Personal data a context may carry; contact traits belong to ``customers`` only.
_CONTEXT_DROPPED = frozenset({"traits", "ip"})


def _text_id(value: Any) -> Any:
    # The SDKs accept numeric user ids and send them as JSON numbers.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


EventName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\- ]+$")]
MessageId = Annotated[str, Field(min_length=1, max_length=128)]
UserId = Annotated[
    str,
    BeforeValidator(_text_id, json_schema_input_type=str | int),
    Field(min_length=1, max_length=200),
]


@dataclass(frozen=True)
class Received:
    """When a request arrived and the batch's own ``sentAt``: the clock-skew correction's
    inputs, passed to validation as its context."""

    at: datetime
    sent_at: datetime | None = None


def _finite(value: Any, path: str) -> None:
    """Refuse NaN and infinities anywhere in a JSON value (the store's JSON cannot hold them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: must be a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _finite(item, f"{path}[{index}]")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_deep(raw: dict[str, Any]) -> list[int | str] | None:
    """Where an event nests deeper than :data:`MAX_NESTING`; None if it does not.
    Iterative over containers only, so no input can exhaust the interpreter's recursion
    and a flat event costs one pass over its top level."""
    stack: list[tuple[dict[Any, Any] | list[Any], list[int | str]]] = [(raw, [])]
    while stack:
        container, path = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(item, dict | list):
                if len(path) + 1 > MAX_NESTING:
                    return path
                stack.append((item, [*path, key]))
    return None


def _lone_surrogate(raw: dict[str, Any]) -> list[int | str]:
    """Where an event that does not encode holds its lone surrogate (a key or a value)."""
    stack: list[tuple[Any, list[int | str]]] = [(raw, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and not _utf8(value):
            return path
        if isinstance(value, dict):
            for key, item in value.items():
                if not _utf8(str(key)):
                    return path
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(value))
    return []


def _screen(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The error of an event too deep, too large, or holding text no store can keep."""
    deep = _too_deep(raw)
    if deep is not None:
        return {
            "loc": deep,
            "msg": f"nested deeper than {MAX_NESTING} levels",
            "type": "value_error",
        }
    try:
        size = len(json.dumps(raw, ensure_ascii=False, default=str).encode())
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry it, no store can
        where = _lone_surrogate(raw)
        return {
            "loc": where,
            "msg": "not valid UTF-8 text (a lone surrogate)",
            "type": "value_error",
        }
    if size > MAX_EVENT_BYTES:
        return {"loc": [], "msg": f"larger than {MAX_EVENT_BYTES} bytes", "type": "too_large"}
    return None


def _bounded(value: dict[str, Any], path: str) -> dict[str, Any]:
    _finite(value, path)
    if len(json.dumps(value)) > MAX_PROPERTIES_BYTES:
        raise ValueError(f"{path}: larger than {MAX_PROPERTIES_BYTES} bytes")
    return value


class _Event(BaseModel):
    # Unknown fields are allowed (kept in ``raw``), never refused: SDKs add new ones.
    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    type: str  # each kind narrows it to its Literal, the batch's discriminator
    messageId: MessageId  # Segment's field names
    userId: UserId | None = None
    anonymousId: UserId | None = None
    timestamp: AwareDatetime | None = None
    sentAt: AwareDatetime | None = None
    context: dict[str, Any] = Field(default_factory=dict)

    # Each kind of call has some of these; every one is bounded and finite.
    @field_validator("context", "properties", "traits", check_fields=False)
    @classmethod
    def _payload(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _bounded(value, str(info.field_name))

    @model_validator(mode="after")
    def _corrected(self, info: ValidationInfo) -> _Event:
        if self.userId is None and self.anonymousId is None and self.type != "alias":
            raise ValueError("userId: required when there is no anonymousId")
        received = info.context if isinstance(info.context, Received) else None
        self.timestamp = corrected_timestamp(self.timestamp, self.sentAt, received)
        if self.timestamp < EPOCH:
            raise ValueError("timestamp: before 1970-01-01")
        if self.timestamp > datetime.now(UTC) + MAX_CLOCK_SKEW:
            raise ValueError(f"timestamp: more than {MAX_CLOCK_SKEW} in the future")
        return self

    @property
    def occurred_at(self) -> datetime:
        """The event's time after clock-skew correction (always set after validation)."""
        assert self.timestamp is not None
        return self.timestamp

    def raw(self) -> dict[str, Any]:
        """What the event carried beyond the fields we read, to store beside it."""
        kept = {k: v for k, v in (self.model_extra or {}).items() if k not in _DROPPED}
        context = {k: v for k, v in self.context.items() if k not in _CONTEXT_DROPPED}
        if context:
            kept["context"] = context
        if self.sentAt is not None:
            kept["sentAt"] = self.sentAt.isoformat()
        return kept


def corrected_timestamp(
    timestamp: datetime | None, sent_at: datetime | None, received: Received | None
) -> datetime:
    """The event's time in our clock, as Segment computes it: ``receivedAt - (sentAt -
    timestamp)`` when the sender's ``sentAt`` is known (its own, or its batch's), so a device
    whose clock is off by hours still records when the event happened; without a timestamp,
    the receive time. ValueError when that time is not a date (before year 1 or after 9999:
    a ``sentAt`` centuries from its ``timestamp``, or 0001-01-01 east of UTC)."""
    sent = sent_at or (received.sent_at if received else None)
    if timestamp is None:
        return received.at if received else datetime.now(UTC)
    try:
        if received is None or sent is None:
            return timestamp.astimezone(UTC)
        return (received.at - (sent - timestamp)).astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("timestamp: out of range in UTC after correcting the clock") from exc


class TrackEvent(_Event):
    """Something a customer did: ``event`` names it, ``properties`` describe it."""

    type: Literal["track"]
    event: EventName
    properties: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _purchase(self) -> TrackEvent:
        # Money and quantities feed monetary features: a wrong one would corrupt them.
        for name in ("amount", "quantity"):
            value = self.properties.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"properties.{name}: must be a number")
            if value < 0:
                raise ValueError(f"properties.{name}: must not be negative")
            if value > MAX_AMOUNT:  # also an integer too large for a float (10**400)
                raise ValueError(f"properties.{name}: larger than {MAX_AMOUNT:.0e}")
        if self.event == "purchase" and "amount" not in self.properties:
            raise ValueError("properties.amount: required for a purchase")
        return self


class ViewEvent(_Event):
    """A ``page`` (web) or ``screen`` (app) view: stored, never counted as a track event."""

    type: Literal["page", "screen"]
    name: Annotated[str, Field(max_length=200)] | None = None
    category: Annotated[str, Field(max_length=200)] | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class IdentifyEvent(_Event):
    """Who a customer is: ``traits`` (``email``, ``timezone`` and any others). With both a
    ``userId`` and an ``anonymousId`` it also merges the anonymous profile into the user."""

    type: Literal["identify"]
    traits: dict[str, Any] = Field(default_factory=dict)

    @field_validator("traits")
    @classmethod
    def _contact(cls, value: dict[str, Any]) -> dict[str, Any]:
        email = value.get("email")
        if email is not None and (not isinstance(email, str) or "@" not in email):
            raise ValueError("traits.email: not an e-mail address")
        zone = value.get("timezone")
        if zone is not None and (not isinstance(zone, str) or not 0 < len(zone) <= 64):
            raise ValueError("traits.timezone: must be a time zone name")
        return value


class GroupEvent(_Event):
    """The customer belongs to an account (``groupId``) described by ``traits``."""

    type: Literal["group"]
    groupId: UserId
    traits: dict[str, Any] = Field(default_factory=dict)


class AliasEvent(_Event):
    """``previousId`` (an anonymous id or an earlier user id) is the same person as
    ``userId``: that profile's history merges into the user's."""

    type: Literal["alias"]
    previousId: UserId
    userId: UserId


AnyEvent = TrackEvent | ViewEvent | IdentifyEvent | GroupEvent | AliasEvent
IncomingEvent = Annotated[AnyEvent, Field(discriminator="type")]
_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(IncomingEvent)


def parse_event(raw: Any, received: Received | None = None) -> AnyEvent | list[dict[str, Any]]:
    """The validated event, or its errors as ``{"loc": [...], "msg": ...}`` (loc in the event).

    ``received`` corrects the event's clock from its ``sentAt`` (see
    :func:`corrected_timestamp`); without it the timestamp is taken as sent.
    """
    if isinstance(raw, dict):
        problem = _screen(raw)
        if problem is not None:
            return [problem]
    try:
        return _ADAPTER.validate_python(raw, context=received)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = []
        for error in exc.errors(include_url=False, include_input=False, include_context=False):
            # Drop the discriminator tag pydantic puts first ("track", ...) from the path.
            loc = list(error["loc"])
            if loc and loc[0] in EVENT_TYPES:
                loc = loc[1:]
            if error["type"].startswith("union_tag"):
                loc = ["type"]
            message = str(error["msg"]).removeprefix("Value error, ")
            # Our validators name the nested field in the message: move it into the path.
            head, _, rest = message.partition(": ")
            if rest and " " not in head and (not loc or head.split(".")[0] == loc[0]):
                loc, message = list[int | str](head.split(".")), rest
            errors.append({"loc": loc, "msg": message, "type": error["type"]})
        return errors
