"""The connector for the bundled sandbox CRM's ``own`` mode: :class:`CrmConnector` over
:class:`~cohortflow.crm.client.CrmClient`.

A library: no Temporal, no storage, no settings. Every write carries its idempotency key,
which the own mode dedupes, so any write may be sent again after any failure. Its dialect
validates a whole batch before writing any of it, so a refused record (the 422 names its
``inputs[i]``) is taken out and the rest sent again: one bad record fails only itself. List
memberships go one member per call (the dialect has no batch for them); unenrolment and
removal are ``DELETE`` calls, ``ok`` when there was nothing to remove.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager

from cohortflow.crm._http import AsyncClosing, RequestGate
from cohortflow.crm.client import MAX_BATCH, ContactUpsert, CrmClient
from cohortflow.crm.connector import (
    ContactState,
    ContactWrite,
    CrmRejected,
    CrmRetryAfter,
    Membership,
    RecordOutcome,
)
from cohortflow.crm.errors import CrmRateLimited

_INPUT = re.compile(r"^inputs\[(\d+)\]")
_NOTES = {
    "created": "created",
    "duplicate": "key replayed: written before",
    "already_enrolled": "already enrolled (under another key)",
    "already_member": "already a member (under another key)",
    "not_enrolled": "was not enrolled",
    "not_member": "was not a member",
}


class SandboxConnector(AsyncClosing):
    """:class:`~cohortflow.crm.connector.CrmConnector` for the sandbox's ``own`` mode."""

    kind = "sandbox"
    max_batch = MAX_BATCH
    max_list_batch = 1  # the own dialect adds or removes one member per request

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        request_gate: RequestGate | None = None,
    ) -> None:
        self.client = CrmClient(base_url, token=token, timeout=timeout, request_gate=request_gate)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def upsert_contacts(self, writes: Sequence[ContactWrite]) -> list[RecordOutcome]:
        """Upsert 1 to 100 contacts; outcomes in input order. Writes naming one contact (or
        one key) twice go in separate calls, in order, as the dialect requires."""
        if not 1 <= len(writes) <= self.max_batch:
            raise ValueError(f"a call holds 1 to {self.max_batch} records, got {len(writes)}")
        outcomes: dict[int, RecordOutcome] = {}
        for round_ in _rounds(writes, lambda w: (w.contact_key, w.key)):
            pending = list(round_)
            while pending:
                records = [
                    ContactUpsert(writes[i].contact_key, writes[i].key, writes[i].properties)
                    for i in pending
                ]
                try:
                    async with _translated():
                        results = await self.client.upsert_contacts(records)
                except CrmRejected as exc:
                    bad = _input_index(exc.field)
                    if bad is None or bad >= len(pending) or exc.status in (401, 403):
                        raise
                    index = pending.pop(bad)
                    outcomes[index] = _refused(writes[index].key, exc)
                    continue
                for index, result in zip(pending, results, strict=True):
                    outcomes[index] = RecordOutcome(
                        writes[index].key,
                        ok=True,
                        crm_id=result.contact_id,
                        note=_NOTES.get(result.status, ""),
                    )
                pending = []
        return [outcomes[i] for i in range(len(writes))]

    async def enroll(self, enrolment: Membership) -> RecordOutcome:
        try:
            async with _translated():
                result = await self.client.enroll_in_sequence(
                    enrolment.contact_key, enrolment.target_id, enrolment.key
                )
        except CrmRejected as exc:
            return _refused_or_raise(enrolment.key, exc)
        return _ok(enrolment.key, result.contact_id, result.status)

    async def unenroll(self, enrolment: Membership) -> RecordOutcome:
        try:
            async with _translated():
                result = await self.client.unenroll_from_sequence(
                    enrolment.contact_key, enrolment.target_id
                )
        except CrmRejected as exc:
            return _refused_or_raise(enrolment.key, exc)
        return _ok(enrolment.key, result.contact_id, result.status)

    async def add_to_list(self, list_id: str, members: Sequence[Membership]) -> list[RecordOutcome]:
        outcomes = []
        for member in members:
            try:
                async with _translated():
                    result = await self.client.add_to_list(member.contact_key, list_id, member.key)
            except CrmRejected as exc:
                outcomes.append(_refused_or_raise(member.key, exc))
                continue
            outcomes.append(_ok(member.key, result.contact_id, result.status))
        return outcomes

    async def remove_from_list(
        self, list_id: str, members: Sequence[Membership]
    ) -> list[RecordOutcome]:
        outcomes = []
        for member in members:
            try:
                async with _translated():
                    result = await self.client.remove_from_list(member.contact_key, list_id)
            except CrmRejected as exc:
                outcomes.append(_refused_or_raise(member.key, exc))
                continue
            outcomes.append(_ok(member.key, result.contact_id, result.status))
        return outcomes

    async def delete_contact(self, contact_key: str) -> RecordOutcome:
        """Delete the contact and its memberships (ok when there was none)."""
        async with _translated():
            await self.client.delete_contact(contact_key)
        return RecordOutcome(contact_key, ok=True)

    async def read_contact(
        self, contact_key: str, properties: Sequence[str] = ()
    ) -> ContactState | None:
        """The contact with every property (the dialect answers them all)."""
        async with _translated():
            record = await self.client.get_contact(contact_key)
        if record is None:
            return None
        return ContactState(
            contact_key=contact_key,
            crm_id=record.contact_id,
            properties=record.properties,
            sequences=record.sequences,
            lists=record.lists,
        )


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """The client's 429 (``CrmRateLimited``) as the protocol's :class:`CrmRetryAfter`."""
    try:
        yield
    except CrmRateLimited as exc:
        raise CrmRetryAfter(exc.retry_after, exc.detail) from exc


def _rounds(
    writes: Sequence[ContactWrite], identities: Callable[[ContactWrite], tuple[str, ...]]
) -> Iterator[list[int]]:
    """Indexes split into calls in which no identity repeats, in order."""
    pending = list(range(len(writes)))
    while pending:
        seen: set[str] = set()
        round_: list[int] = []
        later: list[int] = []
        for index in pending:
            names = identities(writes[index])
            if seen.intersection(names):
                later.append(index)
            else:
                round_.append(index)
            seen.update(names)
        yield round_
        pending = later


def _input_index(field: str | None) -> int | None:
    match = _INPUT.match(field or "")
    return int(match.group(1)) if match else None


def _ok(key: str, crm_id: str, status: str) -> RecordOutcome:
    return RecordOutcome(key, ok=True, crm_id=crm_id, note=_NOTES.get(status, ""))


def _refused(key: str, exc: CrmRejected) -> RecordOutcome:
    where = f" at {exc.field}" if exc.field else ""
    return RecordOutcome(key, ok=False, error=f"{exc.status}{where}: {exc.detail}")


def _refused_or_raise(key: str, exc: CrmRejected) -> RecordOutcome:
    """A one-record call's 4xx is that record's; 401 and 403 refuse every call alike."""
    if exc.status in (401, 403):
        raise exc
    return _refused(key, exc)
