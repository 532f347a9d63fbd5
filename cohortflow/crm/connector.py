"""What cohortflow needs from a CRM, whatever its wire format: the connector protocol.

Writes are per record: contact property upserts and list memberships go in batches (a
connector says how many fit one call), sequence enrolments one per call (HubSpot enrols one
contact at a time). Each record gets its own outcome, so one rejected record fails only the
campaign that wrote it. Whole-call failures are errors that say what the caller should do:

- :class:`CrmRetryAfter`: wait this many seconds, then send again (a 429 with
  ``Retry-After``, or a short rate window such as HubSpot's ten-secondly one);
- :class:`CrmWaitForWindow`: a long window is spent (a daily limit); nothing will pass before
  ``until``;
- :class:`CrmRejected`: the request itself is wrong; sending it again changes nothing;
- :class:`CrmUnavailable`: the CRM or the network failed; ``ambiguous`` says the request may
  have been applied before the failure (a timeout after sending, a reset connection), so the
  caller reads the state back before trying again.

Contacts are addressed by our customer key, stored in the CRM in a unique id property the
connector is configured with; contact data (an e-mail address) travels in ``properties``.
The protocol fits Salesforce's sObject Collections too (200 records a call, per-record
results with ``allOrNone=false``, ``REQUEST_LIMIT_EXCEEDED`` as a daily window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cohortflow.crm.errors import CrmError, CrmRejected, CrmUnavailable

__all__ = [
    "ContactState",
    "ContactWrite",
    "CrmConnector",
    "CrmError",
    "CrmRejected",
    "CrmRetryAfter",
    "CrmUnavailable",
    "CrmWaitForWindow",
    "Membership",
    "RecordOutcome",
]


@dataclass(frozen=True)
class ContactWrite:
    """Set ``properties`` on the contact whose unique id property is ``contact_key`` (created
    if it does not exist). ``key`` is the write's idempotency key."""

    key: str
    contact_key: str
    properties: dict[str, str]


@dataclass(frozen=True)
class Membership:
    """The contact ``contact_key`` in the sequence or list ``target_id``; ``sender_email`` is
    who a sequence's e-mails come from (HubSpot needs one per enrolment)."""

    key: str
    contact_key: str
    target_id: str
    sender_email: str = ""


@dataclass(frozen=True)
class RecordOutcome:
    """One record's result. ``ok``: the CRM holds the effect now (also when it already did).
    Otherwise ``error`` says why and ``retryable`` whether sending it again may succeed;
    ``crm_id`` is the CRM's own id of the contact when known; ``note`` says how an ``ok`` came
    about when that is worth knowing (``already enrolled in this sequence``, ``created``)."""

    key: str
    ok: bool
    crm_id: str = ""
    error: str = ""
    retryable: bool = False
    note: str = ""


@dataclass(frozen=True)
class ContactState:
    """A contact as the CRM holds it: what a read-back after an ambiguous failure checks."""

    contact_key: str
    crm_id: str
    properties: dict[str, str] = field(default_factory=dict)
    sequences: list[str] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)


class CrmRetryAfter(CrmError):
    """Rate limited for a short while: send again after ``seconds``."""

    def __init__(self, seconds: float, detail: str = "rate limited") -> None:
        super().__init__(seconds, detail)
        self.seconds = seconds
        self.detail = detail

    def __str__(self) -> str:
        return f"CRM rate limited, retry after {self.seconds:g}s: {self.detail}"


class CrmWaitForWindow(CrmError):
    """A long rate window (a daily limit) is spent: nothing passes before ``until``."""

    def __init__(self, until: datetime, policy: str, detail: str = "") -> None:
        super().__init__(until, policy, detail)
        self.until = until
        self.policy = policy
        self.detail = detail

    def __str__(self) -> str:
        return f"CRM {self.policy} limit reached until {self.until.isoformat()}: {self.detail}"


class CrmConnector(Protocol):
    """One CRM, spoken to in its own wire format."""

    kind: str  # sandbox | hubspot
    max_batch: int  # contacts per upsert call
    max_list_batch: int  # members per list call (one HTTP request each)

    async def upsert_contacts(self, writes: Sequence[ContactWrite]) -> list[RecordOutcome]:
        """Create or update 1 to ``max_batch`` contacts; outcomes in input order."""

    async def enroll(self, enrolment: Membership) -> RecordOutcome:
        """Enrol one contact in a sequence."""

    async def unenroll(self, enrolment: Membership) -> RecordOutcome:
        """Take one contact out of a sequence (ok when it was not in it)."""

    async def add_to_list(self, list_id: str, members: Sequence[Membership]) -> list[RecordOutcome]:
        """Add 1 to ``max_batch`` contacts to a list; outcomes in input order."""

    async def remove_from_list(
        self, list_id: str, members: Sequence[Membership]
    ) -> list[RecordOutcome]:
        """Remove 1 to ``max_batch`` contacts from a list (ok when one was not in it)."""

    async def read_contact(
        self, contact_key: str, properties: Sequence[str] = ()
    ) -> ContactState | None:
        """The contact with its properties, sequences and lists; None if the CRM has none.

        ``properties`` names properties to read besides those the connector knows of (some
        CRMs, HubSpot among them, answer only the properties asked for): a read-back after
        an ambiguous failure in another process names the ones the write set."""

    async def delete_contact(self, contact_key: str) -> RecordOutcome:
        """Delete the contact for good, with what the CRM ties to it (a data subject's
        erasure); ok when the CRM had none."""

    async def aclose(self) -> None:
        """Release connections."""
