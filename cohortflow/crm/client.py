"""Async connector for a CRM speaking our HubSpot-v3-like HTTP API (the sandbox CRM speaks it).

A library: it knows nothing of Temporal, storage or scoring. Every write carries a caller-made
idempotency key, so the caller may repeat any call after any failure. HTTP outcomes map to
:mod:`cohortflow.crm.errors` by what the caller should do: 429 is :class:`CrmRateLimited`,
other 4xx (but 408) :class:`CrmRejected`, 5xx, 408, timeouts and transport failures
:class:`CrmUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from cohortflow.crm._http import (
    AsyncClosing,
    RequestGate,
    parse_retry_after,
    pooled_client,
    transport_error,
)
from cohortflow.crm.errors import CrmError, CrmRateLimited, CrmRejected, CrmUnavailable

MAX_BATCH = 100
DEFAULT_RETRY_AFTER = 1.0
UPSERT_PATH = "/crm/v3/objects/contacts/batch/upsert"


@dataclass(frozen=True)
class ContactUpsert:
    """One contact to create or update; ``properties`` are merged into the stored ones."""

    contact_id: str
    idempotency_key: str
    properties: dict[str, str]


@dataclass(frozen=True)
class UpsertResult:
    """``status`` is ``created``, ``updated`` or ``duplicate`` (key replayed, nothing changed)."""

    contact_id: str
    status: str


@dataclass(frozen=True)
class EnrollmentResult:
    """``status`` is ``enrolled``, ``already_enrolled`` (under another key) or ``duplicate``."""

    contact_id: str
    sequence_id: str
    status: str


@dataclass(frozen=True)
class ListMembershipResult:
    """``status`` is ``added``, ``already_member`` (under another key) or ``duplicate``."""

    contact_id: str
    list_id: str
    status: str


@dataclass(frozen=True)
class ContactRecord:
    """A contact as the CRM holds it, with the sequences and lists it belongs to."""

    contact_id: str
    properties: dict[str, str]
    sequences: list[str]
    lists: list[str]


class CrmClient(AsyncClosing):
    """Async CRM client over one pooled ``httpx.AsyncClient``; use it as a context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        request_gate: RequestGate | None = None,
    ) -> None:
        self._http = pooled_client(base_url, token, timeout, request_gate)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def upsert_contacts(self, records: Sequence[ContactUpsert]) -> list[UpsertResult]:
        """Create or update 1 to 100 contacts in one call; results come in input order.

        Raises ``ValueError`` before sending anything when the batch size is out of range or a
        record has no idempotency key. The CRM validates the whole batch first, so a
        :class:`CrmRejected` means none of the records was written.
        """
        if not 1 <= len(records) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} records, got {len(records)}")
        for index, record in enumerate(records):
            if not record.idempotency_key:
                raise ValueError(f"record {index} ({record.contact_id!r}) has no idempotency key")
        body = {
            "inputs": [
                {
                    "id": record.contact_id,
                    "idempotency_key": record.idempotency_key,
                    "properties": dict(record.properties),
                }
                for record in records
            ]
        }
        data = await self._call("POST", UPSERT_PATH, body)
        results = _list(data, "results")
        if len(results) != len(records):
            raise CrmError(f"CRM answered {len(results)} results for {len(records)} records")
        return [UpsertResult(_str(item, "id"), _str(item, "status")) for item in results]

    async def enroll_in_sequence(
        self, contact_id: str, sequence_id: str, idempotency_key: str
    ) -> EnrollmentResult:
        """Enrol an existing contact in a sequence, once; an unknown contact is a 404 rejection.

        Raises ``ValueError`` before sending anything when ``idempotency_key`` is empty.
        """
        data = await self._call(
            "POST",
            f"/crm/v3/sequences/{_segment(sequence_id)}/enrollments",
            _membership_body(contact_id, idempotency_key),
        )
        return EnrollmentResult(
            _str(data, "contact_id"), _str(data, "sequence_id"), _str(data, "status")
        )

    async def add_to_list(
        self, contact_id: str, list_id: str, idempotency_key: str
    ) -> ListMembershipResult:
        """Add an existing contact to a list, once; an unknown contact is a 404 rejection.

        Raises ``ValueError`` before sending anything when ``idempotency_key`` is empty.
        """
        data = await self._call(
            "POST",
            f"/crm/v3/lists/{_segment(list_id)}/members",
            _membership_body(contact_id, idempotency_key),
        )
        return ListMembershipResult(
            _str(data, "contact_id"), _str(data, "list_id"), _str(data, "status")
        )

    async def unenroll_from_sequence(self, contact_id: str, sequence_id: str) -> EnrollmentResult:
        """Take a contact out of a sequence. ``status`` is ``unenrolled``, or ``not_enrolled``
        when it was not in it (an unknown contact included): removal is idempotent by nature,
        so it carries no idempotency key."""
        data = await self._call(
            "DELETE",
            f"/crm/v3/sequences/{_segment(sequence_id)}/enrollments/{_segment(contact_id)}",
        )
        return EnrollmentResult(
            _str(data, "contact_id"), _str(data, "sequence_id"), _str(data, "status")
        )

    async def remove_from_list(self, contact_id: str, list_id: str) -> ListMembershipResult:
        """Take a contact off a list. ``status`` is ``removed``, or ``not_member`` when it was
        not on it (an unknown contact included)."""
        data = await self._call(
            "DELETE", f"/crm/v3/lists/{_segment(list_id)}/members/{_segment(contact_id)}"
        )
        return ListMembershipResult(
            _str(data, "contact_id"), _str(data, "list_id"), _str(data, "status")
        )

    async def delete_contact(self, contact_id: str) -> None:
        """Delete a contact and its memberships (nothing to do when there is none)."""
        response = await self._send("DELETE", f"/crm/v3/objects/contacts/{_segment(contact_id)}")
        if response.status_code != 204:
            _decode(response)  # raises for anything but success

    async def get_contact(self, contact_id: str) -> ContactRecord | None:
        """The contact with its properties, sequences and lists, or None if the CRM has none."""
        response = await self._send("GET", f"/crm/v3/objects/contacts/{_segment(contact_id)}")
        if response.status_code == 404:
            return None
        data = _decode(response)
        return ContactRecord(
            contact_id=_str(data, "id"),
            properties=_str_dict(data, "properties"),
            sequences=_str_list(data, "sequences"),
            lists=_str_list(data, "lists"),
        )

    async def healthy(self) -> bool:
        """True when the CRM answers its health check; never raises for network failures."""
        try:
            response = await self._http.get("/healthz")
        except httpx.RequestError:
            return False
        return response.status_code == 200

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return _decode(await self._send(method, path, body))

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        try:
            return await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            # ``ambiguous`` says whether the request may have been applied (see transport_error).
            raise transport_error(method, path, exc) from exc


def _membership_body(contact_id: str, idempotency_key: str) -> dict[str, Any]:
    if not idempotency_key:
        raise ValueError(f"no idempotency key for contact {contact_id!r}")
    return {"contact_id": contact_id, "idempotency_key": idempotency_key}


def _segment(value: str) -> str:
    return quote(value, safe="")


def _decode(response: httpx.Response) -> Any:
    """The JSON body of a 2xx response; any other status raises the matching CrmError."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            return response.json()
        except ValueError as exc:
            raise CrmError(f"CRM answered {status} with a body that is not JSON") from exc
    detail, field = _error_detail(response)
    if status == 429:
        raise CrmRateLimited(_retry_after(response.headers.get("Retry-After")), detail)
    # 408 is the server giving up on a slow request: the same request may well succeed later.
    if status == 408 or status >= 500:
        raise CrmUnavailable(detail, status)
    if 400 <= status < 500:
        raise CrmRejected(status, field, detail)
    raise CrmError(f"unexpected HTTP status {status}: {detail}")


def _error_detail(response: httpx.Response) -> tuple[str, str | None]:
    """The message and offending field path of an error body, tolerating non-JSON bodies."""
    try:
        body = response.json()
    except ValueError:
        return (response.text[:200] or response.reason_phrase), None
    if not isinstance(body, dict):
        return str(body)[:200], None
    message = body.get("message", body.get("detail"))
    detail = message if isinstance(message, str) else response.reason_phrase
    field = body.get("field")
    return detail, field if isinstance(field, str) else None


def _retry_after(header: str | None) -> float:
    """Seconds from a ``Retry-After`` header, given as delay-seconds or as an HTTP date (the
    seconds until then, 0 once it has passed); missing or unreadable means the default."""
    seconds = parse_retry_after(header)
    return DEFAULT_RETRY_AFTER if seconds is None else seconds


def _member(data: Any, key: str) -> object:
    if not isinstance(data, dict) or key not in data:
        raise CrmError(f"malformed CRM response: no {key!r}")
    value: object = data[key]
    return value


def _str(data: Any, key: str) -> str:
    value = _member(data, key)
    if not isinstance(value, str):
        raise CrmError(f"malformed CRM response: {key!r} is not a string")
    return value


def _list(data: Any, key: str) -> list[Any]:
    value = _member(data, key)
    if not isinstance(value, list):
        raise CrmError(f"malformed CRM response: {key!r} is not a list")
    return value


def _str_list(data: Any, key: str) -> list[str]:
    items = _list(data, key)
    if not all(isinstance(item, str) for item in items):
        raise CrmError(f"malformed CRM response: {key!r} holds a non-string")
    return [str(item) for item in items]


def _str_dict(data: Any, key: str) -> dict[str, str]:
    value = _member(data, key)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CrmError(f"malformed CRM response: {key!r} is not a string mapping")
    return {str(k): str(v) for k, v in value.items()}
