"""The sandbox's ``hubspot`` mode data: contacts addressed by unique id properties, sequence
enrolments and list memberships, kept in the sandbox's SQLite file next to the ``own`` mode's
tables (same connection, same lock, one ``BEGIN IMMEDIATE`` transaction per request).

Unlike the ``own`` mode this is not idempotent where HubSpot is not: every enrolment applied is
a row of ``hs_enrollments``, so a duplicate enrolment is counted, never hidden. Property upserts
are idempotent in effect (the same values again change nothing), and list additions of a member
are no-ops, as in HubSpot; ``hs_list_effects`` records every membership that actually changed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cohortflow.crm.sandbox.store import SandboxStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hs_contacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    properties TEXT NOT NULL,
    upserts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hs_contact_keys (
    property TEXT NOT NULL,
    value TEXT NOT NULL,
    contact_id INTEGER NOT NULL REFERENCES hs_contacts (id),
    PRIMARY KEY (property, value)
);
CREATE INDEX IF NOT EXISTS hs_contact_keys_contact ON hs_contact_keys (contact_id);
CREATE TABLE IF NOT EXISTS hs_enrollments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL REFERENCES hs_contacts (id),
    sequence_id TEXT NOT NULL,
    sender_email TEXT NOT NULL,
    user_id TEXT NOT NULL,
    enrolled_at TEXT NOT NULL,
    ended_at TEXT
);
CREATE INDEX IF NOT EXISTS hs_enrollments_contact ON hs_enrollments (contact_id, ended_at);
CREATE TABLE IF NOT EXISTS hs_list_members (
    list_id TEXT NOT NULL,
    contact_id INTEGER NOT NULL REFERENCES hs_contacts (id),
    first_added_at TEXT NOT NULL,
    last_added_at TEXT NOT NULL,
    PRIMARY KEY (list_id, contact_id)
);
CREATE INDEX IF NOT EXISTS hs_list_members_contact ON hs_list_members (contact_id);
CREATE TABLE IF NOT EXISTS hs_list_effects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    list_id TEXT NOT NULL,
    contact_id INTEGER NOT NULL,
    op TEXT NOT NULL,
    at TEXT NOT NULL
);
"""

AlreadyEnrolledPolicy = Literal["apply", "reject"]


@dataclass(frozen=True)
class HsUpsert:
    """One input of a batch upsert: set ``properties`` on the contact whose ``id_property`` is
    ``value``; an empty string clears a property, as in HubSpot."""

    id_property: str
    value: str
    properties: dict[str, str]


@dataclass(frozen=True)
class HsContact:
    id: int
    properties: dict[str, str]
    created_at: str
    updated_at: str
    new: bool = False
    upserts: int = 0
    keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HsEnrollment:
    id: int
    contact_id: int
    sequence_id: str
    sender_email: str
    user_id: str
    enrolled_at: str
    to_email: str


@dataclass(frozen=True)
class HsListMembership:
    list_id: str
    first_added_at: str
    last_added_at: str


class HsNotFound(Exception):
    """No contact with that id."""


class HsAlreadyEnrolled(Exception):
    """The contact has an active enrolment (``already_enrolled="reject"`` only)."""

    def __init__(self, sequence_id: str) -> None:
        super().__init__(sequence_id)
        self.sequence_id = sequence_id


class HubSpotStore:
    """The ``hubspot`` mode's tables in the sandbox's SQLite file."""

    def __init__(self, store: SandboxStore) -> None:
        self._store = store
        with store.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    # ------------------------------------------------------------------ contacts

    def upsert(self, inputs: Sequence[HsUpsert], rejected: set[int]) -> list[HsContact | None]:
        """Apply each input but those whose index is in ``rejected``; results in input order
        (None for a rejected one). The caller has checked the batch for repeated ids."""
        now = _now()
        results: list[HsContact | None] = []
        with self._store.transaction() as db:
            for index, item in enumerate(inputs):
                if index in rejected:
                    results.append(None)
                    continue
                results.append(_upsert_one(db, item, now))
        return results

    def find(self, id_property: str | None, value: str) -> HsContact | None:
        """The contact whose ``id_property`` is ``value``; without a property, by numeric id."""
        with self._store.reading() as db:
            contact_id = _resolve(db, id_property, value)
            return None if contact_id is None else _load(db, contact_id)

    def contacts(self, id_property: str | None = None, value: str | None = None) -> list[HsContact]:
        """Every contact with its keys and upsert count, or those matching a key."""
        with self._store.reading() as db:
            if id_property is not None and value is not None:
                found = _resolve(db, id_property, value)
                ids = [] if found is None else [found]
            else:
                ids = [row[0] for row in db.execute("SELECT id FROM hs_contacts ORDER BY id")]
            return [c for c in (_load(db, i, with_keys=True) for i in ids) if c is not None]

    # ------------------------------------------------------------------ sequences

    def enroll(
        self,
        contact_id: str,
        sequence_id: str,
        sender_email: str,
        user_id: str,
        policy: AlreadyEnrolledPolicy,
    ) -> HsEnrollment:
        """Enrol a contact: a new enrolment row every time, unless ``policy`` is ``reject`` and
        the contact has an active one (HubSpot enrols a contact in one sequence at a time)."""
        with self._store.transaction() as db:
            contact = _load(db, _numeric(contact_id))
            if contact is None:
                raise HsNotFound(contact_id)
            if policy == "reject":
                active = _active_enrollment(db, contact.id)
                if active is not None:
                    raise HsAlreadyEnrolled(active.sequence_id)
            cursor = db.execute(
                "INSERT INTO hs_enrollments (contact_id, sequence_id, sender_email, user_id,"
                " enrolled_at) VALUES (?, ?, ?, ?, ?)",
                (contact.id, sequence_id, sender_email, user_id, _now()),
            )
            row_id = cursor.lastrowid
            assert row_id is not None
            enrollment = _enrollment(db, row_id)
            assert enrollment is not None
            return enrollment

    def gdpr_delete(self, id_property: str | None, value: str) -> bool:
        """Delete the contact and everything tied to it (keys, enrolments, list memberships),
        as HubSpot's GDPR delete does; False when there was no such contact."""
        with self._store.transaction() as db:
            contact_id = _resolve(db, id_property, value)
            if contact_id is None:
                return False
            for table in ("hs_contact_keys", "hs_enrollments", "hs_list_members"):
                db.execute(f"DELETE FROM {table} WHERE contact_id = ?", (contact_id,))
            db.execute("DELETE FROM hs_contacts WHERE id = ?", (contact_id,))
            return True

    def active_enrollment(self, contact_id: str) -> HsEnrollment | None:
        """The contact's latest active enrolment."""
        with self._store.reading() as db:
            return _active_enrollment(db, _numeric(contact_id))

    def unenroll(self, contact_id: str, sequence_id: str) -> int:
        """End the contact's active enrolments in a sequence; how many there were."""
        with self._store.transaction() as db:
            cursor = db.execute(
                "UPDATE hs_enrollments SET ended_at = ? WHERE contact_id = ? AND sequence_id = ?"
                " AND ended_at IS NULL",
                (_now(), _numeric(contact_id), sequence_id),
            )
            return cursor.rowcount

    # ------------------------------------------------------------------ lists

    def add_to_list(self, list_id: str, record_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(added, missing): records that are already members are neither, as in HubSpot."""
        added: list[str] = []
        missing: list[str] = []
        now = _now()
        with self._store.transaction() as db:
            for record_id in dict.fromkeys(record_ids):
                contact_id = _numeric(record_id)
                if _load(db, contact_id) is None:
                    missing.append(record_id)
                    continue
                updated = db.execute(
                    "UPDATE hs_list_members SET last_added_at = last_added_at"
                    " WHERE list_id = ? AND contact_id = ?",
                    (list_id, contact_id),
                )
                if updated.rowcount:
                    continue
                db.execute(
                    "INSERT INTO hs_list_members (list_id, contact_id, first_added_at,"
                    " last_added_at) VALUES (?, ?, ?, ?)",
                    (list_id, contact_id, now, now),
                )
                db.execute(
                    "INSERT INTO hs_list_effects (list_id, contact_id, op, at)"
                    " VALUES (?, ?, 'add', ?)",
                    (list_id, contact_id, now),
                )
                added.append(record_id)
        return added, missing

    def remove_from_list(
        self, list_id: str, record_ids: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """(removed, missing): records that exist but are not members are neither."""
        removed: list[str] = []
        missing: list[str] = []
        now = _now()
        with self._store.transaction() as db:
            for record_id in dict.fromkeys(record_ids):
                contact_id = _numeric(record_id)
                if _load(db, contact_id) is None:
                    missing.append(record_id)
                    continue
                deleted = db.execute(
                    "DELETE FROM hs_list_members WHERE list_id = ? AND contact_id = ?",
                    (list_id, contact_id),
                )
                if deleted.rowcount:
                    db.execute(
                        "INSERT INTO hs_list_effects (list_id, contact_id, op, at)"
                        " VALUES (?, ?, 'remove', ?)",
                        (list_id, contact_id, now),
                    )
                    removed.append(record_id)
        return removed, missing

    def lists_of(self, contact_id: str) -> list[HsListMembership] | None:
        """The lists a contact is on, oldest first; None for an unknown contact."""
        with self._store.reading() as db:
            numeric = _numeric(contact_id)
            if _load(db, numeric) is None:
                return None
            rows = db.execute(
                "SELECT list_id, first_added_at, last_added_at FROM hs_list_members"
                " WHERE contact_id = ? ORDER BY first_added_at, list_id",
                (numeric,),
            ).fetchall()
        return [HsListMembership(r[0], r[1], r[2]) for r in rows]

    # ------------------------------------------------------------------ counts

    def effects(self) -> dict[str, Any]:
        """Effects per (contact, sequence) and (contact, list), and the duplicates among them."""
        with self._store.reading() as db:
            enrolments = db.execute(
                "SELECT contact_id, sequence_id, COUNT(*), SUM(ended_at IS NULL)"
                " FROM hs_enrollments GROUP BY contact_id, sequence_id"
                " ORDER BY contact_id, sequence_id"
            ).fetchall()
            lists = db.execute(
                "SELECT contact_id, list_id, SUM(op = 'add'), SUM(op = 'remove')"
                " FROM hs_list_effects GROUP BY contact_id, list_id ORDER BY contact_id, list_id"
            ).fetchall()
            keys = _all_keys(db)
        return {
            "enrollments": [
                {
                    "contact_id": str(r[0]),
                    "keys": keys.get(r[0], {}),
                    "sequence_id": r[1],
                    "count": r[2],
                    "active": r[3],
                }
                for r in enrolments
            ],
            "list_memberships": [
                {
                    "contact_id": str(r[0]),
                    "keys": keys.get(r[0], {}),
                    "list_id": r[1],
                    "adds": r[2],
                    "removes": r[3],
                }
                for r in lists
            ],
            "duplicate_enrollments": sum(max(r[2] - 1, 0) for r in enrolments),
            "duplicate_list_adds": sum(max(r[2] - r[3] - 1, 0) for r in lists),
        }


def _upsert_one(db: sqlite3.Connection, item: HsUpsert, now: str) -> HsContact:
    contact_id = _resolve(db, item.id_property, item.value)
    if contact_id is None:
        properties = {k: v for k, v in item.properties.items() if v != ""}
        properties[item.id_property] = item.value
        cursor = db.execute(
            "INSERT INTO hs_contacts (properties, upserts, created_at, updated_at)"
            " VALUES (?, 1, ?, ?)",
            (json.dumps(properties), now, now),
        )
        new_id = cursor.lastrowid
        assert new_id is not None
        db.execute(
            "INSERT INTO hs_contact_keys (property, value, contact_id) VALUES (?, ?, ?)",
            (item.id_property, item.value, new_id),
        )
        return HsContact(new_id, _with_object_id(properties, new_id), now, now, new=True)
    row = db.execute(
        "SELECT properties, created_at FROM hs_contacts WHERE id = ?", (contact_id,)
    ).fetchone()
    properties = json.loads(row[0])
    for name, value in item.properties.items():
        if value == "":
            properties.pop(name, None)
        else:
            properties[name] = value
    properties[item.id_property] = item.value
    db.execute(
        "UPDATE hs_contacts SET properties = ?, upserts = upserts + 1, updated_at = ? WHERE id = ?",
        (json.dumps(properties), now, contact_id),
    )
    return HsContact(contact_id, _with_object_id(properties, contact_id), row[1], now)


def _resolve(db: sqlite3.Connection, id_property: str | None, value: str) -> int | None:
    if id_property is None or id_property == "hs_object_id":
        numeric = _numeric(value)
        found = db.execute("SELECT id FROM hs_contacts WHERE id = ?", (numeric,)).fetchone()
        return None if found is None else int(found[0])
    row = db.execute(
        "SELECT contact_id FROM hs_contact_keys WHERE property = ? AND value = ?",
        (id_property, value),
    ).fetchone()
    return None if row is None else int(row[0])


def _load(db: sqlite3.Connection, contact_id: int, *, with_keys: bool = False) -> HsContact | None:
    row = db.execute(
        "SELECT properties, created_at, updated_at, upserts FROM hs_contacts WHERE id = ?",
        (contact_id,),
    ).fetchone()
    if row is None:
        return None
    keys: dict[str, str] = {}
    if with_keys:
        keys = {
            str(k[0]): str(k[1])
            for k in db.execute(
                "SELECT property, value FROM hs_contact_keys WHERE contact_id = ?", (contact_id,)
            )
        }
    properties = _with_object_id(json.loads(row[0]), contact_id)
    return HsContact(contact_id, properties, row[1], row[2], upserts=row[3], keys=keys)


def _all_keys(db: sqlite3.Connection) -> dict[int, dict[str, str]]:
    keys: dict[int, dict[str, str]] = {}
    for prop, value, contact_id in db.execute(
        "SELECT property, value, contact_id FROM hs_contact_keys"
    ):
        keys.setdefault(int(contact_id), {})[str(prop)] = str(value)
    return keys


def _active_enrollment(db: sqlite3.Connection, contact_id: int) -> HsEnrollment | None:
    row = db.execute(
        "SELECT id FROM hs_enrollments WHERE contact_id = ? AND ended_at IS NULL"
        " ORDER BY id DESC LIMIT 1",
        (contact_id,),
    ).fetchone()
    return None if row is None else _enrollment(db, int(row[0]))


def _enrollment(db: sqlite3.Connection, enrollment_id: int) -> HsEnrollment | None:
    row = db.execute(
        "SELECT e.id, e.contact_id, e.sequence_id, e.sender_email, e.user_id, e.enrolled_at,"
        " c.properties FROM hs_enrollments e JOIN hs_contacts c ON c.id = e.contact_id"
        " WHERE e.id = ?",
        (enrollment_id,),
    ).fetchone()
    if row is None:
        return None
    email = json.loads(row[6]).get("email", "")
    return HsEnrollment(row[0], row[1], row[2], row[3], row[4], row[5], str(email))


def _with_object_id(properties: dict[str, str], contact_id: int) -> dict[str, str]:
    return {**properties, "hs_object_id": str(contact_id)}


def _numeric(value: str) -> int:
    """A HubSpot record id; anything else matches no record."""
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else -1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
