"""What an incoming event must look like (Segment-style ``track`` and ``identify``).

Each event is validated alone, so one bad event is rejected with its field paths while the
rest of its batch is kept.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_BATCH_EVENTS = 1_000
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_PROPERTIES_BYTES = 32 * 1024  # Segment's own per-event limit
# Clocks drift: a timestamp slightly ahead of ours is plausible, a day ahead is not.
MAX_CLOCK_SKEW = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CONTACT_TRAITS = frozenset({"email", "timezone"})

EventName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\- ]+$")]
MessageId = Annotated[str, Field(min_length=1, max_length=128)]
UserId = Annotated[str, Field(min_length=1, max_length=200)]


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


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    messageId: MessageId  # Segment's field names
    userId: UserId
    timestamp: AwareDatetime

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, value: datetime) -> datetime:
        if value < EPOCH:
            raise ValueError("before 1970-01-01")
        if value > datetime.now(UTC) + MAX_CLOCK_SKEW:
            raise ValueError(f"more than {MAX_CLOCK_SKEW} in the future")
        return value.astimezone(UTC)


class TrackEvent(_Event):
    """Something a customer did: ``event`` names it, ``properties`` describe it."""

    type: Literal["track"]
    event: EventName
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: dict[str, Any]) -> dict[str, Any]:
        _finite(value, "properties")
        if len(json.dumps(value)) > MAX_PROPERTIES_BYTES:
            raise ValueError(f"larger than {MAX_PROPERTIES_BYTES} bytes")
        return value

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
        if self.event == "purchase" and "amount" not in self.properties:
            raise ValueError("properties.amount: required for a purchase")
        return self


class IdentifyEvent(_Event):
    """Who a customer is: ``traits`` (``email``, ``timezone`` and any others)."""

    type: Literal["identify"]
    traits: dict[str, Any] = Field(default_factory=dict)

    @field_validator("traits")
    @classmethod
    def _traits(cls, value: dict[str, Any]) -> dict[str, Any]:
        _finite(value, "traits")
        if len(json.dumps(value)) > MAX_PROPERTIES_BYTES:
            raise ValueError(f"larger than {MAX_PROPERTIES_BYTES} bytes")
        email = value.get("email")
        if email is not None and (not isinstance(email, str) or "@" not in email):
            raise ValueError("traits.email: not an e-mail address")
        zone = value.get("timezone")
        if zone is not None and (not isinstance(zone, str) or not 0 < len(zone) <= 64):
            raise ValueError("traits.timezone: must be a time zone name")
        return value


IncomingEvent = Annotated[TrackEvent | IdentifyEvent, Field(discriminator="type")]
_ADAPTER: TypeAdapter[TrackEvent | IdentifyEvent] = TypeAdapter(IncomingEvent)


def parse_event(raw: Any) -> TrackEvent | IdentifyEvent | list[dict[str, Any]]:
    """The validated event, or its errors as ``{"loc": [...], "msg": ...}`` (loc in the event)."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = []
        for error in exc.errors(include_url=False, include_input=False):
            # Drop the discriminator tag pydantic inserts ("track"/"identify") from the path.
            loc = [p for p in error["loc"] if p not in ("track", "identify")]
            message = str(error["msg"]).removeprefix("Value error, ")
            # Our validators name the nested field in the message: move it into the path.
            head, _, rest = message.partition(": ")
            if rest and " " not in head and (not loc or head.split(".")[0] == loc[0]):
                loc, message = list[int | str](head.split(".")), rest
            errors.append({"loc": loc, "msg": message, "type": error["type"]})
        return errors
