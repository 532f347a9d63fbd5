"""The sandbox CRM's SQLite store: contacts, memberships, idempotency keys and the request log.

Plain blocking ``sqlite3`` on one connection behind a lock; the app calls it through
``asyncio.to_thread`` so the event loop never waits on the disk. Every write is a single
``BEGIN IMMEDIATE`` transaction, so a batch is checked and written all or nothing, and two
requests carrying the same key cannot both pass the check. Everything lives in the file, so
dedupe state survives a restart of the sandbox.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

MembershipKind = Literal["sequence", "list"]

# (new membership, membership that already existed under another key)
_MEMBERSHIP_STATUSES: dict[MembershipKind, tuple[str, str]] = {
    "sequence": ("enrolled", "already_enrolled"),
    "list": ("added", "already_member"),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    contact_id TEXT PRIMARY KEY,
    properties TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS memberships (
    kind TEXT NOT NULL,
    group_id TEXT NOT NULL,
    contact_id TEXT NOT NULL REFERENCES contacts (contact_id),
    created_at TEXT NOT NULL,
    PRIMARY KEY (kind, group_id, contact_id)
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    body_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    idempotency_keys TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS request_keys (
    key TEXT NOT NULL,
    request_id INTEGER NOT NULL REFERENCES requests (id),
    PRIMARY KEY (key, request_id)
);
"""

# The request log's columns added since the first release: the matched route (``/crm/objects/
# {version}/contacts/batch/upsert``, for counts by operation) and whether the reply was dropped.
_REQUEST_COLUMNS_ADDED = {
    "route": "TEXT NOT NULL DEFAULT ''",
    "dropped": "INTEGER NOT NULL DEFAULT 0",
}


@dataclass(frozen=True)
class UpsertRecord:
    """One validated input of a batch upsert."""

    contact_id: str
    idempotency_key: str
    properties: dict[str, str]


@dataclass(frozen=True)
class FieldProblem:
    """Why one field of a request was refused; ``field`` is a path like ``inputs[2].id``."""

    field: str
    message: str


class ValidationFailed(Exception):
    """The request was refused as a whole and nothing was written."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__(problems)
        self.problems = problems


class ContactNotFound(Exception):
    """A membership named a contact the store does not hold."""

    def __init__(self, contact_id: str) -> None:
        super().__init__(contact_id)
        self.contact_id = contact_id


@dataclass(frozen=True)
class StoredContact:
    """A contact with the sequences and lists it belongs to, oldest membership first."""

    contact_id: str
    properties: dict[str, str]
    sequences: list[str]
    lists: list[str]


@dataclass(frozen=True)
class LoggedRequest:
    """One ``/crm/`` request as the sandbox answered it."""

    id: int
    method: str
    path: str
    status: int
    idempotency_keys: list[str]
    at: str
    route: str = ""
    dropped: bool = False


@dataclass(frozen=True)
class RequestCount:
    """How many requests one (method, route, status) got; ``dropped``: replies never sent."""

    method: str
    route: str
    status: int
    dropped: bool
    count: int


class SandboxStore:
    """The sandbox's SQLite file; thread-safe, one connection, one writer at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Transactions are explicit (BEGIN IMMEDIATE), hence autocommit mode.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        _add_missing_columns(self._db, "requests", _REQUEST_COLUMNS_ADDED)

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        with self._lock:
            self._db.close()

    def upsert_contacts(self, records: Sequence[UpsertRecord]) -> list[str]:
        """Merge each record into its contact; statuses in input order.

        The whole batch is checked first: a key used before with another body, or an id or
        key repeated within the batch, raises :class:`ValidationFailed` and writes nothing.
        A key used before with the same body is ``duplicate`` and changes nothing.
        """
        digests = [
            _body_hash({"op": "upsert", "id": r.contact_id, "properties": r.properties})
            for r in records
        ]
        with self._transaction() as db:
            problems: list[FieldProblem] = []
            replayed: list[bool] = []
            ids: set[str] = set()
            keys: set[str] = set()
            for index, (record, digest) in enumerate(zip(records, digests, strict=True)):
                if record.contact_id in ids:
                    problems.append(
                        FieldProblem(f"inputs[{index}].id", "appears more than once in the batch")
                    )
                if record.idempotency_key in keys:
                    problems.append(
                        FieldProblem(
                            f"inputs[{index}].idempotency_key",
                            "appears more than once in the batch",
                        )
                    )
                ids.add(record.contact_id)
                keys.add(record.idempotency_key)
                known = _known_hash(db, record.idempotency_key)
                if known is not None and known != digest:
                    problems.append(
                        FieldProblem(
                            f"inputs[{index}].idempotency_key",
                            "was used before with a different body",
                        )
                    )
                replayed.append(known == digest)
            if problems:
                raise ValidationFailed(problems)
            now = _now()
            statuses: list[str] = []
            for record, digest, duplicate in zip(records, digests, replayed, strict=True):
                if duplicate:
                    statuses.append("duplicate")
                    continue
                statuses.append(_merge_contact(db, record, now))
                _remember_key(db, record.idempotency_key, digest, now)
            return statuses

    def add_membership(
        self, kind: MembershipKind, group_id: str, contact_id: str, idempotency_key: str
    ) -> str:
        """Put a contact in a sequence or list once; returns the membership status.

        Raises :class:`ValidationFailed` (field ``idempotency_key``) for a key used before
        with another body and :class:`ContactNotFound` for an unknown contact; neither
        records the key, so the same key works once the request is right.
        """
        digest = _body_hash({"op": kind, "group_id": group_id, "contact_id": contact_id})
        created, existing = _MEMBERSHIP_STATUSES[kind]
        with self._transaction() as db:
            known = _known_hash(db, idempotency_key)
            if known == digest:
                return "duplicate"
            if known is not None:
                raise ValidationFailed(
                    [FieldProblem("idempotency_key", "was used before with a different body")]
                )
            found = db.execute("SELECT 1 FROM contacts WHERE contact_id = ?", (contact_id,))
            if found.fetchone() is None:
                raise ContactNotFound(contact_id)
            now = _now()
            inserted = db.execute(
                "INSERT OR IGNORE INTO memberships (kind, group_id, contact_id, created_at)"
                " VALUES (?, ?, ?, ?)",
                (kind, group_id, contact_id, now),
            )
            _remember_key(db, idempotency_key, digest, now)
            return created if inserted.rowcount == 1 else existing

    def remove_membership(self, kind: MembershipKind, group_id: str, contact_id: str) -> bool:
        """Take a contact out of a sequence or list; False when it was not in it."""
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM memberships WHERE kind = ? AND group_id = ? AND contact_id = ?",
                (kind, group_id, contact_id),
            )
            return deleted.rowcount == 1

    def delete_contact(self, contact_id: str) -> bool:
        """Delete the contact and its memberships; False when there was none."""
        with self._transaction() as db:
            db.execute("DELETE FROM memberships WHERE contact_id = ?", (contact_id,))
            deleted = db.execute("DELETE FROM contacts WHERE contact_id = ?", (contact_id,))
            return deleted.rowcount == 1

    def get_contact(self, contact_id: str) -> StoredContact | None:
        """The contact with its memberships, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT properties FROM contacts WHERE contact_id = ?", (contact_id,)
            ).fetchone()
            if row is None:
                return None
            members = self._db.execute(
                "SELECT kind, group_id FROM memberships WHERE contact_id = ? ORDER BY rowid",
                (contact_id,),
            ).fetchall()
        properties: dict[str, str] = json.loads(row[0])
        return StoredContact(
            contact_id=contact_id,
            properties=properties,
            sequences=[group for kind, group in members if kind == "sequence"],
            lists=[group for kind, group in members if kind == "list"],
        )

    def log_request(
        self,
        method: str,
        path: str,
        status: int,
        keys: Sequence[str],
        *,
        route: str = "",
        dropped: bool = False,
    ) -> None:
        """Append one answered request to the log. ``route`` is the path template it matched;
        ``dropped``: the request was handled (and ``status`` decided) but the reply was never
        sent, the connection was cut instead."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO requests (method, path, status, idempotency_keys, at, route, dropped)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (method, path, status, json.dumps(list(keys)), _now(), route or path, int(dropped)),
            )
            db.executemany(
                "INSERT OR IGNORE INTO request_keys (key, request_id) VALUES (?, ?)",
                [(key, cursor.lastrowid) for key in keys],
            )

    def requests(self, idempotency_key: str | None = None) -> list[LoggedRequest]:
        """Logged requests, oldest first; only those carrying ``idempotency_key`` if given."""
        columns = "r.id, r.method, r.path, r.status, r.idempotency_keys, r.at, r.route, r.dropped"
        with self._lock:
            if idempotency_key is None:
                rows = self._db.execute(f"SELECT {columns} FROM requests r ORDER BY r.id")
            else:
                rows = self._db.execute(
                    f"SELECT {columns} FROM requests r"
                    " JOIN request_keys k ON k.request_id = r.id"
                    " WHERE k.key = ? ORDER BY r.id",
                    (idempotency_key,),
                )
            return [
                LoggedRequest(
                    id=row[0],
                    method=row[1],
                    path=row[2],
                    status=row[3],
                    idempotency_keys=json.loads(row[4]),
                    at=row[5],
                    route=row[6],
                    dropped=bool(row[7]),
                )
                for row in rows.fetchall()
            ]

    def request_counts(self) -> list[RequestCount]:
        """How many requests each (method, route, status) got, dropped replies apart."""
        with self._lock:
            rows = self._db.execute(
                "SELECT method, route, status, dropped, COUNT(*) FROM requests"
                " GROUP BY method, route, status, dropped ORDER BY method, route, status, dropped"
            ).fetchall()
        return [
            RequestCount(method=r[0], route=r[1], status=r[2], dropped=bool(r[3]), count=r[4])
            for r in rows
        ]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on the store's connection, for the tables other
        sandbox modes add (:mod:`cohortflow.crm.sandbox.hubspot`)."""
        with self._transaction() as db:
            yield db

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The store's connection for reads, under its lock."""
        with self._lock:
            yield self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def _add_missing_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Columns added after a store file was first created (the file survives upgrades)."""
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for name, declaration in columns.items():
        if name not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")


def _body_hash(body: dict[str, object]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _known_hash(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT body_hash FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _remember_key(db: sqlite3.Connection, key: str, digest: str, now: str) -> None:
    db.execute(
        "INSERT INTO idempotency_keys (key, body_hash, created_at) VALUES (?, ?, ?)",
        (key, digest, now),
    )


def _merge_contact(db: sqlite3.Connection, record: UpsertRecord, now: str) -> str:
    row = db.execute(
        "SELECT properties FROM contacts WHERE contact_id = ?", (record.contact_id,)
    ).fetchone()
    if row is None:
        db.execute(
            "INSERT INTO contacts (contact_id, properties, created_at, updated_at)"
            " VALUES (?, ?, ?, ?)",
            (record.contact_id, json.dumps(record.properties), now, now),
        )
        return "created"
    merged = json.loads(row[0]) | record.properties
    db.execute(
        "UPDATE contacts SET properties = ?, updated_at = ? WHERE contact_id = ?",
        (json.dumps(merged), now, record.contact_id),
    )
    return "updated"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
