"""HubSpot, spoken in its own wire format: the connector a production deployment uses.

A library: no Temporal, no storage, no settings. A private app's access token goes as a bearer
token. Paths are HubSpot's date-versioned ones (``2026-03``) by default, the legacy v3/v4 ones
with ``paths="legacy"``. What it sends (HubSpot's API reference, developers.hubspot.com/docs/
api-reference/{2026-03,legacy}/...):

- contacts: ``POST /crm/objects/2026-03/contacts/batch/upsert`` (legacy ``/crm/v3/objects/
  contacts/batch/upsert``), ``{"inputs": [{"idProperty", "id", "properties",
  "objectWriteTraceId"}]}``, at most 100 (``crm/objects/contacts/batch/upsert-contacts``). A
  207 answer lists per-input ``errors`` whose ``context.objectWriteTraceId`` names the input
  (``api-reference/error-handling``, multi-status errors); each input becomes one outcome.
- HubSpot's own contact id, which enrolments and lists need, comes from the upsert's results or
  ``POST .../contacts/batch/read`` ``{"idProperty", "inputs": [{"id"}]}``, and is cached.
- sequences: ``POST /automation/sequences/2026-03/enrollments?userId=`` (legacy
  ``/automation/v4/sequences/enrollments``) ``{"contactId", "sequenceId", "senderEmail"}``
  (``automation/sequences/enroll-contact``); read back with ``GET .../enrollments/contact/
  {contactId}``, which answers the contact's one active enrolment (``get-enrollment``).
- lists: ``PUT /crm/lists/2026-03/{listId}/memberships/add`` and ``/remove`` (legacy
  ``/crm/v3/lists/...``) with a JSON array of record ids; the answer's ``recordIdsMissing``
  fail their members (``crm/lists/memberships/add-to-list``). Read back with ``GET
  /crm/lists/2026-03/records/0-1/{recordId}/memberships`` (``get-lists-per-record``).
- the contact itself: ``GET /crm/objects/2026-03/contacts/{key}?idProperty=&properties=``.

Choices where HubSpot is silent or does not fit the protocol:

- Enrolling a contact HubSpot already has enrolled is answered ``ALREADY_ENROLLED`` (HubSpot
  enrols a contact in one sequence at a time; knowledge.hubspot.com, "contact can't be enrolled
  in this sequence"). The connector reads the enrolment back: the same sequence is ``ok`` (the
  effect holds; ``note`` says so), another one fails the record, not retryable.
- HubSpot documents no unenrolment endpoint (2026-03 nor v4). ``unenroll`` is ``ok`` when the
  contact is not in the sequence; otherwise it posts ``{"contactId", "sequenceId"}`` to
  ``sequence_unenroll_path`` when one is configured, and fails the record when none is.
- 429 (HubSpot's own usage guidelines, ``docs/api/usage-details``): a ``Retry-After`` in either
  form wins. HubSpot sends none, only ``policyName`` in the body: ``DAILY`` waits for the next
  midnight in the account's time zone (``daily_reset_timezone``, UTC unless configured: the
  connector cannot read the account's setting), anything else (``TEN_SECONDLY_ROLLING``,
  ``SECONDLY``) for the rest of the window, ``X-HubSpot-RateLimit-Interval-Milliseconds`` long:
  until this connector's oldest request still in it leaves it, a full window if it has none.
- 401 and 403 refuse every request alike (a wrong token or a missing scope): ``CrmRejected``,
  also for one-record calls. Other 4xx on a one-record call (an enrolment) fail that record;
  on a batch they are the whole request's (``CrmRejected``). 5xx are ``CrmUnavailable``,
  ambiguous but for a 503.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any, Literal, NoReturn
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from cohortflow.crm._http import (
    AsyncClosing,
    RequestGate,
    ident,
    ident_list,
    json_body,
    member_list,
    obj,
    parse_retry_after,
    pooled_client,
    text,
    transport_error,
)
from cohortflow.crm.connector import (
    ContactState,
    ContactWrite,
    CrmError,
    CrmRejected,
    CrmRetryAfter,
    CrmUnavailable,
    CrmWaitForWindow,
    Membership,
    RecordOutcome,
)

DEFAULT_URL = "https://api.hubapi.com"
MAX_BATCH = 100
CONTACTS_OBJECT_TYPE = "0-1"
ApiPaths = Literal["2026-03", "legacy"]
# Per-record error categories a later attempt may get past.
RETRYABLE_CATEGORIES = frozenset(
    {"RATE_LIMITS", "INTERNAL_ERROR", "SERVICE_UNAVAILABLE", "TIMEOUT", "CONFLICT", "LOCKED"}
)
_DEFAULT_INTERVAL = {"SECONDLY": 1.0}  # seconds; HubSpot's rolling window otherwise
_ROLLING_WINDOW = 10.0
_MAX_LIST_PAGES = 100


@dataclass(frozen=True)
class HubSpotPaths:
    """Every path the connector uses; ``{...}`` fields are filled URL-quoted."""

    upsert: str
    batch_read: str
    contact: str
    gdpr_delete: str
    enroll: str
    enrollment: str
    list_add: str
    list_remove: str
    record_lists: str

    @classmethod
    def dated(cls, version: str = "2026-03") -> HubSpotPaths:
        objects = f"/crm/objects/{version}/contacts"
        sequences = f"/automation/sequences/{version}/enrollments"
        lists = f"/crm/lists/{version}"
        return cls(
            upsert=f"{objects}/batch/upsert",
            batch_read=f"{objects}/batch/read",
            contact=f"{objects}/{{contact_id}}",
            gdpr_delete=f"{objects}/gdpr-delete",
            enroll=sequences,
            enrollment=f"{sequences}/contact/{{contact_id}}",
            list_add=f"{lists}/{{list_id}}/memberships/add",
            list_remove=f"{lists}/{{list_id}}/memberships/remove",
            record_lists=f"{lists}/records/{CONTACTS_OBJECT_TYPE}/{{record_id}}/memberships",
        )

    @classmethod
    def legacy(cls) -> HubSpotPaths:
        return cls(
            upsert="/crm/v3/objects/contacts/batch/upsert",
            batch_read="/crm/v3/objects/contacts/batch/read",
            contact="/crm/v3/objects/contacts/{contact_id}",
            gdpr_delete="/crm/v3/objects/contacts/gdpr-delete",
            enroll="/automation/v4/sequences/enrollments",
            enrollment="/automation/v4/sequences/enrollments/contact/{contact_id}",
            list_add="/crm/v3/lists/{list_id}/memberships/add",
            list_remove="/crm/v3/lists/{list_id}/memberships/remove",
            record_lists=f"/crm/v3/lists/records/{CONTACTS_OBJECT_TYPE}/{{record_id}}/memberships",
        )

    @classmethod
    def of(cls, paths: str) -> HubSpotPaths:
        if paths == "legacy":
            return cls.legacy()
        if paths == "2026-03":
            return cls.dated(paths)
        raise ValueError(f"paths must be 2026-03 or legacy, not {paths!r}")


class HubSpotConnector(AsyncClosing):
    """:class:`~cohortflow.crm.connector.CrmConnector` for HubSpot over one pooled client."""

    kind = "hubspot"
    max_batch = MAX_BATCH
    max_list_batch = MAX_BATCH

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        paths: str = "2026-03",
        id_property: str = "cohortflow_key",
        sender_email: str = "",
        user_id: str = "",
        daily_reset_timezone: str = "UTC",
        read_properties: Sequence[str] = (),
        sequence_unenroll_path: str | None = None,
        id_cache_size: int = 100_000,
        clock: Callable[[], datetime] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        request_gate: RequestGate | None = None,
    ) -> None:
        if not id_property:
            raise ValueError("id_property must name HubSpot's unique contact property")
        try:
            self._zone = ZoneInfo(daily_reset_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {daily_reset_timezone!r}") from exc
        self.paths = HubSpotPaths.of(paths)
        self.id_property = id_property
        self._sender_email = sender_email
        self._user_id = user_id
        self._unenroll_path = sequence_unenroll_path or None
        self._read_properties = set(read_properties)
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._id_cache_size = id_cache_size
        self._admitted: deque[float] = deque(maxlen=1000)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._http = pooled_client(base_url, token, timeout, request_gate, transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ contacts

    async def upsert_contacts(self, writes: Sequence[ContactWrite]) -> list[RecordOutcome]:
        """Upsert 1 to 100 contacts by the id property; outcomes in input order.

        Two writes to one contact go in separate calls, in order (HubSpot refuses a batch that
        names an id twice). Raises ``ValueError`` before sending for a batch out of range.
        """
        _check_size(writes, self.max_batch)
        outcomes: dict[int, RecordOutcome] = {}
        for round_ in _rounds([w.contact_key for w in writes]):
            outcomes.update(await self._upsert_round([(i, writes[i]) for i in round_]))
        return [outcomes[i] for i in range(len(writes))]

    async def _upsert_round(
        self, items: Sequence[tuple[int, ContactWrite]]
    ) -> dict[int, RecordOutcome]:
        traces = {_trace(n, write.key): index for n, (index, write) in enumerate(items)}
        inputs = [
            {
                "idProperty": self.id_property,
                "id": write.contact_key,
                "properties": dict(write.properties),
                "objectWriteTraceId": trace,
            }
            for trace, (_, write) in zip(traces, items, strict=True)
        ]
        response = await self._send("POST", self.paths.upsert, json={"inputs": inputs})
        if not response.is_success:
            self._raise_for(response)
        data = obj(json_body(response), "the upsert answer")
        results = member_list(data, "results", "the upsert answer", required=True)
        errors = member_list(data, "errors", "the upsert answer", required=False)
        writes = dict(items)
        by_key = {write.contact_key: index for index, write in items}
        outcomes: dict[int, RecordOutcome] = {}
        for n, item in enumerate(results):
            result = obj(item, f"results[{n}]")
            crm_id = ident(result.get("id"), f"results[{n}].id")
            index = self._matching(result, traces, by_key, f"results[{n}]")
            if index is None and len(results) == len(items) and not errors:
                index = items[n][0]
            if index is None:
                continue
            write = writes[index]
            self._remember(write.contact_key, crm_id)
            self._read_properties.update(write.properties)
            new = result.get("new") is True
            outcomes[index] = RecordOutcome(write.key, ok=True, crm_id=crm_id, note=_new(new))
        for n, item in enumerate(errors):
            error = obj(item, f"errors[{n}]")
            category = text(error, "category", f"errors[{n}]", required=False)
            message = text(error, "message", f"errors[{n}]", required=False) or "refused"
            named = self._named(error, traces, by_key, f"errors[{n}]")
            if not named and len(items) == 1:
                named = [items[0][0]]
            for index in named:
                outcomes.setdefault(
                    index,
                    RecordOutcome(
                        writes[index].key,
                        ok=False,
                        error=f"{category or 'ERROR'}: {message}",
                        retryable=category in RETRYABLE_CATEGORIES,
                    ),
                )
        for index, write in items:
            outcomes.setdefault(
                index,
                RecordOutcome(
                    write.key,
                    ok=False,
                    error="the CRM answered nothing for this record",
                    retryable=True,
                ),
            )
        return outcomes

    def _matching(
        self, result: dict[str, Any], traces: dict[str, int], by_key: dict[str, int], what: str
    ) -> int | None:
        trace = result.get("objectWriteTraceId")
        if trace is not None:
            if not isinstance(trace, str):
                raise CrmError(f"malformed CRM response: {what}.objectWriteTraceId")
            if trace in traces:
                return traces[trace]
        properties = result.get("properties")
        if properties is None:
            return None
        value = obj(properties, f"{what}.properties").get(self.id_property)
        return by_key.get(value) if isinstance(value, str) else None

    @staticmethod
    def _named(
        error: dict[str, Any], traces: dict[str, int], by_key: dict[str, int], what: str
    ) -> list[int]:
        context = error.get("context")
        if context is None:
            return []
        context = obj(context, f"{what}.context")
        named = [
            traces[t]
            for t in ident_list(context, "objectWriteTraceId", f"{what}.context")
            if t in traces
        ]
        named += [by_key[k] for k in ident_list(context, "ids", f"{what}.context") if k in by_key]
        return list(dict.fromkeys(named))

    async def _contact_ids(self, keys: Sequence[str]) -> dict[str, str]:
        """HubSpot's ids of the contacts with these keys (those it has): cached, or read in
        batches of 100 by the id property."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for key in dict.fromkeys(keys):
            cached = self._ids.get(key)
            if cached is None:
                missing.append(key)
            else:
                self._ids.move_to_end(key)
                found[key] = cached
        for start in range(0, len(missing), MAX_BATCH):
            chunk = missing[start : start + MAX_BATCH]
            body = {
                "idProperty": self.id_property,
                "inputs": [{"id": key} for key in chunk],
                "properties": [self.id_property],
            }
            response = await self._send("POST", self.paths.batch_read, json=body)
            if response.status_code == 404:
                continue
            if not response.is_success:
                self._raise_for(response)
            data = obj(json_body(response), "the batch read answer")
            results = member_list(data, "results", "the batch read answer", required=True)
            member_list(data, "errors", "the batch read answer", required=False)
            wanted = set(chunk)
            for n, item in enumerate(results):
                result = obj(item, f"results[{n}]")
                crm_id = ident(result.get("id"), f"results[{n}].id")
                properties = result.get("properties")
                value = (
                    obj(properties, f"results[{n}].properties").get(self.id_property)
                    if properties is not None
                    else None
                )
                if not isinstance(value, str) and len(chunk) == len(results) == 1:
                    value = chunk[0]
                if isinstance(value, str) and value in wanted:
                    found[value] = crm_id
                    self._remember(value, crm_id)
        return found

    def _remember(self, key: str, crm_id: str) -> None:
        self._ids[key] = crm_id
        self._ids.move_to_end(key)
        while len(self._ids) > self._id_cache_size:
            self._ids.popitem(last=False)

    def _forget(self, key: str) -> None:
        self._ids.pop(key, None)

    # ------------------------------------------------------------------ sequences

    async def enroll(self, enrolment: Membership) -> RecordOutcome:
        """Enrol one contact (HubSpot's enrolment endpoint takes one)."""
        key = enrolment.key
        sender = enrolment.sender_email or self._sender_email
        if not sender:
            return _refused(key, "no sender e-mail: HubSpot enrols with a connected inbox")
        if not self._user_id:
            return _refused(key, "no HubSpot user id: the enrolment endpoint requires userId")
        crm_id = (await self._contact_ids([enrolment.contact_key])).get(enrolment.contact_key)
        if crm_id is None:
            return _refused(key, f"no contact with {self.id_property}={enrolment.contact_key}")
        response = await self._send(
            "POST",
            self.paths.enroll,
            params={"userId": self._user_id},
            json={"contactId": crm_id, "sequenceId": enrolment.target_id, "senderEmail": sender},
        )
        if response.is_success:
            data = obj(json_body(response), "the enrolment answer")
            enrolment_id = ident(data.get("id"), "the enrolment answer's id")
            return RecordOutcome(key, ok=True, crm_id=crm_id, note=f"enrolment {enrolment_id}")
        detail = self._record_refusal(response)
        if _says_already_enrolled(response):
            current = await self._enrolled_sequence(crm_id)
            if current == enrolment.target_id:
                note = "already enrolled in this sequence: the effect holds"
                return RecordOutcome(key, ok=True, crm_id=crm_id, note=note)
            if current is None:
                return RecordOutcome(
                    key,
                    ok=False,
                    crm_id=crm_id,
                    retryable=True,
                    error=f"ALREADY_ENROLLED, yet no active enrolment reads back: {detail}",
                )
            return RecordOutcome(
                key,
                ok=False,
                crm_id=crm_id,
                error=f"ALREADY_ENROLLED in sequence {current}: HubSpot enrols a contact"
                " in one sequence at a time",
            )
        if response.status_code == 404:
            self._forget(enrolment.contact_key)
        return RecordOutcome(key, ok=False, crm_id=crm_id, error=detail)

    async def unenroll(self, enrolment: Membership) -> RecordOutcome:
        """Take one contact out of a sequence: ``ok`` when it is not in it."""
        key = enrolment.key
        crm_id = (await self._contact_ids([enrolment.contact_key])).get(enrolment.contact_key)
        if crm_id is None:
            return RecordOutcome(key, ok=True, note="no such contact: not enrolled")
        if await self._enrolled_sequence(crm_id) != enrolment.target_id:
            return RecordOutcome(key, ok=True, crm_id=crm_id, note="not enrolled in it")
        if self._unenroll_path is None:
            return _refused(
                key,
                "HubSpot's sequences API documents no unenrolment endpoint; unenrol in HubSpot"
                " or configure sequence_unenroll_path",
                crm_id,
            )
        params = {"userId": self._user_id} if self._user_id else None
        response = await self._send(
            "POST",
            self._unenroll_path,
            params=params,
            json={"contactId": crm_id, "sequenceId": enrolment.target_id},
        )
        if response.is_success:
            return RecordOutcome(key, ok=True, crm_id=crm_id)
        return RecordOutcome(key, ok=False, crm_id=crm_id, error=self._record_refusal(response))

    async def _enrolled_sequence(self, crm_id: str) -> str | None:
        """The sequence of the contact's active enrolment (HubSpot has one at most)."""
        path = self.paths.enrollment.format(contact_id=quote(crm_id, safe=""))
        response = await self._send("GET", path)
        if response.status_code == 404:
            return None
        if not response.is_success:
            self._raise_for(response)
        data = obj(json_body(response), "the enrolment status")
        sequence = data.get("sequenceId")
        return None if sequence is None else ident(sequence, "the enrolment's sequenceId")

    # ------------------------------------------------------------------ lists

    async def add_to_list(self, list_id: str, members: Sequence[Membership]) -> list[RecordOutcome]:
        """Add 1 to 100 contacts to a (manual or snapshot) list in one call."""
        _check_size(members, self.max_batch)
        ids = await self._contact_ids([m.contact_key for m in members])
        added, missing = await self._change_list(self.paths.list_add, list_id, ids, "Added")
        outcomes = []
        for member in members:
            crm_id = ids.get(member.contact_key)
            if crm_id is None:
                error = f"no contact with {self.id_property}={member.contact_key}"
                outcomes.append(_refused(member.key, error))
            elif crm_id in missing:
                self._forget(member.contact_key)
                outcomes.append(_refused(member.key, f"HubSpot has no record {crm_id}", crm_id))
            else:
                note = "" if crm_id in added else "already a member"
                outcomes.append(RecordOutcome(member.key, ok=True, crm_id=crm_id, note=note))
        return outcomes

    async def remove_from_list(
        self, list_id: str, members: Sequence[Membership]
    ) -> list[RecordOutcome]:
        """Remove 1 to 100 contacts from a list in one call; ``ok`` for one not on it."""
        _check_size(members, self.max_batch)
        ids = await self._contact_ids([m.contact_key for m in members])
        removed, missing = await self._change_list(self.paths.list_remove, list_id, ids, "Removed")
        outcomes = []
        for member in members:
            crm_id = ids.get(member.contact_key)
            if crm_id is None or crm_id in missing:
                note = "no such contact: not a member"
                outcomes.append(RecordOutcome(member.key, ok=True, crm_id=crm_id or "", note=note))
            else:
                note = "" if crm_id in removed else "was not a member"
                outcomes.append(RecordOutcome(member.key, ok=True, crm_id=crm_id, note=note))
        return outcomes

    async def _change_list(
        self, template: str, list_id: str, ids: dict[str, str], verb: str
    ) -> tuple[set[str], set[str]]:
        record_ids = list(dict.fromkeys(ids.values()))
        if not record_ids:
            return set(), set()
        path = template.format(list_id=quote(list_id, safe=""))
        response = await self._send("PUT", path, json=record_ids)
        if not response.is_success:
            self._raise_for(response)
        data = obj(json_body(response), "the list membership answer")
        what = "the list membership answer"
        # HubSpot spells the added ones recordsIdsAdded; accept the regular spelling too.
        changed = {
            *ident_list(data, f"recordsIds{verb}", what),
            *ident_list(data, f"recordIds{verb}", what),
        }
        return changed, set(ident_list(data, "recordIdsMissing", what))

    async def _lists_of(self, crm_id: str) -> list[str]:
        path = self.paths.record_lists.format(record_id=quote(crm_id, safe=""))
        lists: list[str] = []
        after: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            response = await self._send("GET", path, params={"after": after} if after else None)
            if response.status_code == 404:
                return lists
            if not response.is_success:
                self._raise_for(response)
            data = obj(json_body(response), "the list memberships")
            for n, item in enumerate(
                member_list(data, "results", "the list memberships", required=True)
            ):
                lists.append(ident(obj(item, f"results[{n}]").get("listId"), "listId"))
            paging = data.get("paging")
            following = obj(paging, "paging").get("next") if paging is not None else None
            after = (
                text(obj(following, "paging.next"), "after", "paging.next", required=False)
                if following is not None
                else ""
            )
            if not after:
                return lists
        raise CrmError(f"the CRM pages list memberships past {_MAX_LIST_PAGES} pages")

    # ------------------------------------------------------------------ read-back

    async def delete_contact(self, contact_key: str) -> RecordOutcome:
        """HubSpot's GDPR delete, by our key property: the contact and everything tied to it,
        for good (ok when HubSpot has no such contact)."""
        body = {"objectId": contact_key, "idProperty": self.id_property}
        response = await self._send("POST", self.paths.gdpr_delete, json=body)
        if response.status_code != 404 and not response.is_success:
            self._raise_for(response)
        self._ids.pop(contact_key, None)
        return RecordOutcome(contact_key, ok=True)

    async def read_contact(
        self, contact_key: str, properties: Sequence[str] = ()
    ) -> ContactState | None:
        """The contact as HubSpot holds it: ``properties``, those this connector has written
        and ``read_properties`` (HubSpot answers only the properties asked for), its active
        sequence, its lists; None when HubSpot has none."""
        wanted = (self._read_properties | set(properties)) - {self.id_property}
        names = [self.id_property, *sorted(wanted)]
        response = await self._send(
            "GET",
            self.paths.contact.format(contact_id=quote(contact_key, safe="")),
            params={"idProperty": self.id_property, "properties": ",".join(names)},
        )
        if response.status_code == 404:
            self._forget(contact_key)
            return None
        if not response.is_success:
            self._raise_for(response)
        data = obj(json_body(response), "the contact")
        crm_id = ident(data.get("id"), "the contact's id")
        held: dict[str, str] = {}
        for name, value in obj(data.get("properties"), "the contact's properties").items():
            if value is None:
                continue
            if not isinstance(value, str):
                raise CrmError(f"malformed CRM response: property {name!r} is not a string")
            held[name] = value
        self._remember(contact_key, crm_id)
        sequence = await self._enrolled_sequence(crm_id)
        lists = await self._lists_of(crm_id)
        return ContactState(
            contact_key=contact_key,
            crm_id=crm_id,
            properties=held,
            sequences=[sequence] if sequence else [],
            lists=lists,
        )

    # ------------------------------------------------------------------ HTTP

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, params=params, json=json)
        except httpx.HTTPError as exc:
            raise transport_error(method, path, exc) from exc
        if response.status_code != 429:
            # When the answer came: no earlier than the CRM counted the request.
            self._admitted.append(time.monotonic())
        return response

    def _raise_for(self, response: httpx.Response) -> NoReturn:
        """The error for a whole request's non-2xx answer."""
        status = response.status_code
        detail, field = _error_detail(response)
        if status == 429:
            raise self._rate_limited(response, detail)
        if status == 408:
            raise CrmUnavailable(detail, status, ambiguous=False)
        if status >= 500:
            # A 503 is the CRM refusing work; a 500, 502 or 504 may come after it was done.
            raise CrmUnavailable(detail, status, ambiguous=status != 503)
        if 400 <= status < 500:
            raise CrmRejected(status, field, detail)
        raise CrmError(f"unexpected HTTP status {status}: {detail}")

    def _record_refusal(self, response: httpx.Response) -> str:
        """For a one-record call: raise what concerns every request (rate limits, outages,
        credentials); otherwise the record's refusal, as text."""
        status = response.status_code
        if status in (401, 403) or status == 408 or status == 429 or not 400 <= status < 500:
            self._raise_for(response)
        detail, _ = _error_detail(response)
        return f"{status}: {detail}"

    def _rate_limited(self, response: httpx.Response, detail: str) -> CrmError:
        now = self._clock()
        seconds = parse_retry_after(response.headers.get("Retry-After"), now)
        if seconds is not None:
            return CrmRetryAfter(seconds, detail)
        policy = _policy(response)
        daily_spent = response.headers.get("X-HubSpot-RateLimit-Daily-Remaining", "").strip()
        if policy == "DAILY" or (policy is None and daily_spent == "0"):
            return CrmWaitForWindow(self.next_daily_reset(now), "DAILY", detail)
        interval = _interval(response) or _DEFAULT_INTERVAL.get(policy or "", _ROLLING_WINDOW)
        return CrmRetryAfter(self._rest_of_window(interval), f"{policy or '429'}: {detail}")

    def next_daily_reset(self, now: datetime) -> datetime:
        """The next midnight in the account's time zone, in UTC."""
        local = now.astimezone(self._zone)
        midnight = datetime.combine(local.date() + timedelta(days=1), clock_time(0), self._zone)
        return midnight.astimezone(UTC)

    def _rest_of_window(self, interval: float) -> float:
        """Until this connector's oldest admitted request in the rolling window leaves it (no
        request of anyone's can have entered before it and still be in: a slot is free by
        then); a whole window when it sent none in it."""
        now = time.monotonic()
        inside = [t for t in self._admitted if t > now - interval]
        wait = min(inside) + interval - now + 0.01 if inside else interval
        return round(min(max(wait, 0.05), interval), 3)


def _check_size(items: Sequence[object], limit: int) -> None:
    if not 1 <= len(items) <= limit:
        raise ValueError(f"a call holds 1 to {limit} records, got {len(items)}")


def _rounds(keys: Sequence[str]) -> Iterator[list[int]]:
    """Indexes split into calls in which no key repeats, each key's writes in order."""
    pending = list(range(len(keys)))
    while pending:
        seen: set[str] = set()
        round_: list[int] = []
        later: list[int] = []
        for index in pending:
            (later if keys[index] in seen else round_).append(index)
            seen.add(keys[index])
        yield round_
        pending = later


def _trace(n: int, key: str) -> str:
    """The input's ``objectWriteTraceId``: unique in its call, traceable to our key."""
    return f"cf{n}-{hashlib.blake2s(key.encode(), digest_size=6).hexdigest()}"


def _new(new: bool) -> str:
    return "created" if new else ""


def _refused(key: str, error: str, crm_id: str = "") -> RecordOutcome:
    return RecordOutcome(key, ok=False, crm_id=crm_id, error=error, retryable=False)


def _error_detail(response: httpx.Response) -> tuple[str, str | None]:
    """HubSpot's error message and the field it names (``errors[0].in``), tolerating any body."""
    try:
        body = response.json()
    except ValueError:
        return (response.text[:200] or response.reason_phrase or str(response.status_code)), None
    if not isinstance(body, dict):
        return str(body)[:200], None
    message = body.get("message")
    detail = message if isinstance(message, str) else response.reason_phrase
    category = body.get("category") or body.get("errorType")
    if isinstance(category, str) and category:
        detail = f"{category}: {detail}"
    errors = body.get("errors")
    field = None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        named = errors[0].get("in")
        field = named if isinstance(named, str) else None
    return detail, field


def _policy(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    policy = body.get("policyName") if isinstance(body, dict) else None
    return policy.strip().upper() if isinstance(policy, str) and policy.strip() else None


def _interval(response: httpx.Response) -> float | None:
    value = response.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
    try:
        milliseconds = float(value) if value is not None else None
    except ValueError:
        return None
    if milliseconds is None or not 0 < milliseconds < 86_400_000:
        return None
    return milliseconds / 1000


def _says_already_enrolled(response: httpx.Response) -> bool:
    return "ALREADY_ENROLLED" in response.text.upper().replace(" ", "_")
