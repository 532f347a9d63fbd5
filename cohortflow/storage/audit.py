"""The append-only, hash-chained audit trail: append, verify, read.

Each row's ``hash`` covers its sequence number, the previous row's hash and its content
exactly as stored (the rules: ``cohortflow.audit.chain``), so changing, removing or
reordering any row breaks the chain from that row on. The database refuses UPDATE and
DELETE (and TRUNCATE on PostgreSQL) on ``audit_log``; :func:`verify_chain` proves nothing
slipped past.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.audit.chain import (
    GENESIS_HASH,
    Anchor,
    Link,
    RowContent,
    chain_hash,
    content_hash,
    link_problem,
)
from cohortflow.storage._sql import canonical_json, dialect_name, in_list, table_of, utc
from cohortflow.storage.tables import AuditRow

# One fixed advisory lock key ("cohortau" in ASCII) that every appender on a PostgreSQL
# database takes, so appends are serialised and the chain never forks.
AUDIT_LOCK_ID = 0x636F686F72746175
VERIFY_BATCH_SIZE = 5_000


@dataclass(frozen=True)
class AuditEvent:
    """One decision or effect to record; (workflow_id, step_id, kind) identifies it."""

    workflow_id: str
    step_id: str
    kind: str
    campaign_id: str
    customer_key: str
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class Appended:
    """Where an event sits in the chain; ``created`` is False when it was already there."""

    seq: int
    hash: str
    created: bool


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_chain`; ``rows`` counts the rows found good, and
    ``head_hash`` is the hash of the last of them (the genesis hash for none)."""

    ok: bool
    rows: int
    first_bad_seq: int | None
    problem: str
    head_hash: str = GENESIS_HASH


async def anchor_problem(session: AsyncSession, report: VerifyReport, anchor: Anchor) -> str:
    """Why a verified chain does not reach ``anchor`` ("" when it does)."""
    if anchor.seq == 0:
        return ""
    if report.rows < anchor.seq:
        return (
            f"the chain ends at seq {report.rows} but was anchored at seq {anchor.seq} on "
            f"{anchor.at}: rows were cut from its tail"
        )
    stored = await session.scalar(select(AuditRow.hash).where(AuditRow.seq == anchor.seq))
    if stored != anchor.hash:
        return f"seq {anchor.seq} does not match its anchor of {anchor.at}"
    return ""


async def append_audit(
    session: AsyncSession, event: AuditEvent, *, now: datetime | None = None
) -> Appended:
    """Append ``event`` to the chain inside the caller's open transaction.

    Appends are serialised: on PostgreSQL by a transaction-scoped advisory lock, on SQLite
    by the write lock every ``BEGIN IMMEDIATE`` transaction holds (see ``db.create_engine``).
    Either way the primary key on ``seq`` turns a fork into an error rather than a branch.
    The lock is held until the caller's transaction ends, so keep that transaction short.
    If (workflow_id, step_id, kind) is already recorded, that row is returned unchanged
    with ``created=False``. The payload must be JSON-serialisable (no NaN).
    """
    return (await append_many(session, [event], now=now))[0]


async def append_many(
    session: AsyncSession, events: Sequence[AuditEvent], *, now: datetime | None = None
) -> list[Appended]:
    """Append ``events`` in order, as :func:`append_audit` appends one, in a few statements
    whatever their number (group commit of concurrent activities); one result per event."""
    if not events:
        return []
    if dialect_name(session) == "postgresql":
        await session.execute(text(f"SELECT pg_advisory_xact_lock({AUDIT_LOCK_ID})"))
    wanted = list(dict.fromkeys((e.workflow_id, e.step_id, e.kind) for e in events))
    found: dict[tuple[str, str, str], tuple[int, str]] = {}
    wanted_set = set(wanted)
    # By the workflow's index alone (row-value IN lists defeat PostgreSQL's planner).
    for chunk in in_list(sorted({workflow_id for workflow_id, _, _ in wanted})):
        columns = (AuditRow.workflow_id, AuditRow.step_id, AuditRow.kind)
        rows = await session.execute(
            select(*columns, AuditRow.seq, AuditRow.hash).where(AuditRow.workflow_id.in_(chunk))
        )
        found |= {(w, s, k): (seq, h) for w, s, k, seq, h in rows if (w, s, k) in wanted_set}
    last = (
        await session.execute(
            select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
        )
    ).first()
    seq, prev_hash = (0, GENESIS_HASH) if last is None else (last.seq, last.hash)
    created_at = utc(now).isoformat(timespec="microseconds")
    appended: list[Appended] = []
    rows_to_insert: list[dict[str, Any]] = []
    for event in events:
        key = (event.workflow_id, event.step_id, event.kind)
        if key in found:
            appended.append(Appended(seq=found[key][0], hash=found[key][1], created=False))
            continue
        seq += 1
        content = RowContent(
            event.workflow_id,
            event.step_id,
            event.kind,
            event.campaign_id,
            event.customer_key,
            canonical_json(dict(event.payload)),
            created_at,
        )
        digest = content_hash(content)
        row_hash = chain_hash(seq, prev_hash, digest)
        rows_to_insert.append(
            {
                "seq": seq, "workflow_id": content.workflow_id, "step_id": content.step_id,
                "kind": content.kind, "campaign_id": content.campaign_id,
                "customer_key": content.customer_key, "payload": content.payload,
                "created_at": created_at, "prev_hash": prev_hash, "hash": row_hash,
                "content_hash": digest,
            }
        )  # fmt: skip
        found[key] = (seq, row_hash)
        prev_hash = row_hash
        appended.append(Appended(seq=seq, hash=row_hash, created=True))
    if rows_to_insert:
        await session.execute(insert(table_of(AuditRow)), rows_to_insert)
    return appended


LINK_COLUMNS = (
    AuditRow.seq,
    AuditRow.prev_hash,
    AuditRow.hash,
    AuditRow.content_hash,
    AuditRow.workflow_id,
    AuditRow.step_id,
    AuditRow.kind,
    AuditRow.campaign_id,
    AuditRow.customer_key,
    AuditRow.payload,
    AuditRow.created_at,
)


def link_of(row: Any) -> Link:
    """The chain's view of a row selected with :data:`LINK_COLUMNS`."""
    seq, prev, row_hash, digest, *content = row
    return Link(seq, prev, row_hash, digest, RowContent(*content))


async def links_from(
    session: AsyncSession, first_seq: int, *, batch_size: int = VERIFY_BATCH_SIZE
) -> AsyncIterator[Link]:
    """Every row from ``first_seq`` on in chain order, ``batch_size`` rows at a time (rows
    appended meanwhile included), so memory stays bounded whatever the table size."""
    next_seq = first_seq
    while True:
        batch = (
            await session.execute(
                select(*LINK_COLUMNS)
                .where(AuditRow.seq >= next_seq)
                .order_by(AuditRow.seq)
                .limit(batch_size)
            )
        ).all()
        if not batch:
            return
        for row in batch:
            yield link_of(row)
        next_seq = batch[-1].seq + 1


async def verify_chain(
    session: AsyncSession, *, batch_size: int = VERIFY_BATCH_SIZE
) -> VerifyReport:
    """Recompute every hash and check every link, reading ``batch_size`` rows at a time.

    Use ``Database.read_transaction()`` for the session so a long verification does not
    hold SQLite's write lock. Rows appended while verifying are verified too.
    """
    prev_hash = GENESIS_HASH
    good = 0
    async for link in links_from(session, 1, batch_size=batch_size):
        expected = good + 1
        problem = link_problem(link, expected, prev_hash)
        if problem:
            if link.seq != expected:
                problem = f"seq {expected} is missing (next row has seq {link.seq})"
            return VerifyReport(
                ok=False, rows=good, first_bad_seq=min(link.seq, expected), problem=problem
            )
        prev_hash = link.hash
        good += 1
    return VerifyReport(ok=True, rows=good, first_bad_seq=None, problem="", head_hash=prev_hash)


async def audit_for_customer(session: AsyncSession, customer_key: str) -> list[AuditRow]:
    """Every audit row about one customer, in chain order."""
    result = await session.scalars(
        select(AuditRow).where(AuditRow.customer_key == customer_key).order_by(AuditRow.seq)
    )
    return list(result)


async def audit_for_workflow(session: AsyncSession, workflow_id: str) -> list[AuditRow]:
    """Every audit row one campaign workflow wrote, in chain order."""
    result = await session.scalars(
        select(AuditRow).where(AuditRow.workflow_id == workflow_id).order_by(AuditRow.seq)
    )
    return list(result)


async def audit_for_campaign(
    session: AsyncSession, campaign_id: str, kinds: Collection[str]
) -> list[AuditRow]:
    """The audit rows of one campaign's workflows whose kind is one of ``kinds``, in chain
    order."""
    result = await session.scalars(
        select(AuditRow)
        .where(AuditRow.campaign_id == campaign_id, AuditRow.kind.in_(list(kinds)))
        .order_by(AuditRow.seq)
    )
    return list(result)
