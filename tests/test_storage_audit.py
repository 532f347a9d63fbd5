"""The audit trail: chaining, dedupe, the database's append-only guard, tamper detection and
concurrent appends from several OS processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from cohortflow.audit.chain import GENESIS_HASH
from cohortflow.storage.audit import (
    AuditEvent,
    append_audit,
    audit_for_campaign,
    audit_for_customer,
    audit_for_workflow,
    verify_chain,
)
from cohortflow.storage.db import Database
from cohortflow.storage.tables import AuditRow
from tests.conftest import postgres_only

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def event(
    workflow: str = "wf-1", step: str = "s1", kind: str = "decision", **payload: Any
) -> AuditEvent:
    return AuditEvent(
        workflow_id=workflow,
        step_id=step,
        kind=kind,
        campaign_id="camp",
        customer_key=f"c_{workflow}",
        payload=payload,
    )


async def append_many(db: Database, count: int, workflow: str = "wf") -> None:
    async with db.transaction() as session:
        for i in range(count):
            await append_audit(
                session, event(workflow, f"s{i}", i=i), now=T0 + timedelta(seconds=i)
            )


async def row_count(db: Database) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(AuditRow)) or 0)


async def verify(db: Database, batch_size: int = 5_000) -> Any:
    async with db.read_transaction() as session:
        return await verify_chain(session, batch_size=batch_size)


async def allow_tampering(db: Database, session: Any) -> None:
    """Switch the append-only guard off, as only someone with DDL rights could."""
    if db.dialect == "postgresql":
        await session.execute(text("ALTER TABLE audit_log DISABLE TRIGGER ALL"))
    else:
        await session.execute(text("DROP TRIGGER audit_log_no_update"))
        await session.execute(text("DROP TRIGGER audit_log_no_delete"))


# ---------------------------------------------------------------- appending


async def test_append_chains_rows_and_verifies(db: Database) -> None:
    async with db.transaction() as session:
        first = await append_audit(session, event(step="s1", b=1, a="é"), now=T0)
        second = await append_audit(session, event(step="s2"), now=T0 + timedelta(seconds=1))
    assert (first.seq, first.created) == (1, True)
    assert (second.seq, second.created) == (2, True)

    async with db.transaction() as session:
        rows = await audit_for_workflow(session, "wf-1")
    assert [r.seq for r in rows] == [1, 2]
    assert rows[0].prev_hash == GENESIS_HASH
    assert rows[1].prev_hash == rows[0].hash == first.hash
    assert rows[1].hash == second.hash
    assert rows[0].payload == '{"a":"é","b":1}'
    assert rows[0].created_at == "2025-03-01T12:00:00.000000+00:00"

    report = await verify(db)
    assert (report.ok, report.rows, report.first_bad_seq) == (True, 2, None)


async def test_hash_is_sha256_of_the_documented_canonical_arrays(db: Database) -> None:
    paris = timezone(timedelta(hours=1))
    async with db.transaction() as session:
        appended = await append_audit(session, event(z=[1, 2], a=None), now=T0.astimezone(paris))
        stored = await session.scalar(select(AuditRow.content_hash))

    def sha256(value: Any) -> str:
        material = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(material.encode()).hexdigest()

    content = sha256(
        [
            "wf-1",
            "s1",
            "decision",
            "camp",
            "c_wf-1",
            '{"a":null,"z":[1,2]}',
            "2025-03-01T12:00:00.000000+00:00",
        ]
    )
    assert stored == content
    assert appended.hash == sha256([1, GENESIS_HASH, content])


async def test_same_workflow_step_kind_is_recorded_once(db: Database) -> None:
    async with db.transaction() as session:
        first = await append_audit(session, event(x=1))
    async with db.transaction() as session:
        again = await append_audit(session, event(x=2))
        other_kind = await append_audit(session, event(kind="crm_write", x=2))
    assert again.created is False
    assert (again.seq, again.hash) == (first.seq, first.hash)
    assert other_kind.created is True and other_kind.seq == 2

    async with db.transaction() as session:
        rows = await audit_for_workflow(session, "wf-1")
    assert [(r.kind, json.loads(r.payload)) for r in rows] == [
        ("decision", {"x": 1}),
        ("crm_write", {"x": 2}),
    ]


async def test_append_rolled_back_with_its_transaction_leaves_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with db.transaction() as session:
            await append_audit(session, event())
            raise RuntimeError("boom")
    assert await row_count(db) == 0
    async with db.transaction() as session:
        appended = await append_audit(session, event(step="s2"))
    assert appended.seq == 1
    assert (await verify(db)).ok


async def test_unserialisable_payload_is_refused_before_writing(db: Database) -> None:
    with pytest.raises(ValueError):
        async with db.transaction() as session:
            await append_audit(session, event(score=float("nan")))
    with pytest.raises(TypeError):
        async with db.transaction() as session:
            await append_audit(session, event(when=T0))
    assert await row_count(db) == 0


async def test_naive_timestamp_is_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="naive"):
        async with db.transaction() as session:
            await append_audit(session, event(), now=datetime(2025, 1, 1))


async def test_reads_by_customer_and_workflow(db: Database) -> None:
    async with db.transaction() as session:
        await append_audit(session, event("wf-a", "s1"))
        await append_audit(session, event("wf-b", "s1"))
        await append_audit(session, event("wf-a", "s2"))
    async with db.transaction() as session:
        by_workflow = await audit_for_workflow(session, "wf-a")
        by_customer = await audit_for_customer(session, "c_wf-b")
        nobody = await audit_for_customer(session, "c_nobody")
    assert [(r.seq, r.step_id) for r in by_workflow] == [(1, "s1"), (3, "s2")]
    assert [r.seq for r in by_customer] == [2]
    assert nobody == []


async def test_reads_by_campaign_and_kinds(db: Database) -> None:
    async with db.transaction() as session:
        await append_audit(session, event("wf-a", "s1", kind="finished"))
        await append_audit(session, event("wf-a", "s0", kind="scored"))
        await append_audit(session, event("wf-b", "s1", kind="variant_assigned"))
        await append_audit(session, AuditEvent("wf-c", "s1", "finished", "other", "c_wf-c", {}))
    async with db.transaction() as session:
        rows = await audit_for_campaign(session, "camp", ("variant_assigned", "finished"))
        none = await audit_for_campaign(session, "camp", ())
    assert [(r.seq, r.workflow_id, r.kind) for r in rows] == [
        (1, "wf-a", "finished"),
        (3, "wf-b", "variant_assigned"),
    ]
    assert none == []


# ---------------------------------------------------------------- the database's guard


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET payload = '{}' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 1"],
)
async def test_database_rejects_update_and_delete(db: Database, statement: str) -> None:
    await append_many(db, 2)
    with pytest.raises(DBAPIError, match="append-only"):
        async with db.transaction() as session:
            await session.execute(text(statement))
    assert await row_count(db) == 2
    assert (await verify(db)).ok


async def test_database_rejects_delete_all(db: Database) -> None:
    await append_many(db, 2)
    with pytest.raises(DBAPIError, match="append-only"):
        async with db.transaction() as session:
            await session.execute(text("DELETE FROM audit_log"))
    assert await row_count(db) == 2


@postgres_only
async def test_postgres_rejects_truncate(db: Database) -> None:
    await append_many(db, 2)
    with pytest.raises(DBAPIError, match="append-only"):
        async with db.transaction() as session:
            await session.execute(text("TRUNCATE audit_log"))
    assert await row_count(db) == 2


# ---------------------------------------------------------------- tamper detection


async def test_verify_detects_an_edited_payload(db: Database) -> None:
    await append_many(db, 5)
    async with db.transaction() as session:
        await allow_tampering(db, session)
        edited = await session.execute(
            text("UPDATE audit_log SET payload = :p WHERE seq = 3"), {"p": '{"i":99}'}
        )
        assert edited.rowcount == 1  # type: ignore[attr-defined]
    report = await verify(db)
    assert report.ok is False
    assert report.first_bad_seq == 3
    assert report.rows == 2
    assert "content" in report.problem


async def test_verify_detects_a_rehashed_row_at_the_next_link(db: Database) -> None:
    await append_many(db, 5)
    async with db.transaction() as session:
        await allow_tampering(db, session)
        await session.execute(text("UPDATE audit_log SET hash = :h WHERE seq = 2"), {"h": "f" * 64})
    report = await verify(db)
    assert (report.ok, report.first_bad_seq) == (False, 2)


async def test_verify_detects_a_deleted_row(db: Database) -> None:
    await append_many(db, 5)
    async with db.transaction() as session:
        await allow_tampering(db, session)
        await session.execute(text("DELETE FROM audit_log WHERE seq = 4"))
    report = await verify(db)
    assert (report.ok, report.first_bad_seq, report.rows) == (False, 4, 3)
    assert "missing" in report.problem


async def test_verify_detects_a_forged_row_inserted_past_append_audit(db: Database) -> None:
    await append_many(db, 2)
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO audit_log (seq, workflow_id, step_id, kind, campaign_id,"
                " customer_key, payload, created_at, prev_hash, hash) VALUES"
                " (3, 'wf', 'x', 'forged', 'camp', 'c', '{}', 'now', :prev, :h)"
            ),
            {"prev": GENESIS_HASH, "h": "e" * 64},
        )
    report = await verify(db)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "prev_hash" in report.problem


async def test_verify_walks_batches_and_finds_damage_past_the_first(db: Database) -> None:
    await append_many(db, 23)
    report = await verify(db, batch_size=5)
    assert (report.ok, report.rows) == (True, 23)

    async with db.transaction() as session:
        await allow_tampering(db, session)
        await session.execute(text("""UPDATE audit_log SET step_id = 'x' WHERE seq = 12"""))
    report = await verify(db, batch_size=5)
    assert (report.ok, report.first_bad_seq, report.rows) == (False, 12, 11)


async def test_empty_chain_verifies(db: Database) -> None:
    report = await verify(db)
    assert (report.ok, report.rows, report.first_bad_seq) == (True, 0, None)


# ---------------------------------------------------------------- concurrency

WORKERS = 2
PER_WORKER = 150


def _append_worker(url: str, worker: int, count: int, start: Any) -> None:
    """Entry point of one spawned process: its own engine, one transaction per append."""
    asyncio.run(_append_from_process(url, worker, count, start))


async def _append_from_process(url: str, worker: int, count: int, start: Any) -> None:
    db = Database(url)
    try:
        async with db.transaction() as session:
            await session.execute(text("SELECT 1"))  # connect before the start line
        start.wait(timeout=60)
        for i in range(count):
            async with db.transaction() as session:
                await append_audit(session, event(f"wf-{worker}", f"s{i}", worker=worker, i=i))
            # An activity does other work between appends; let the other process in.
            await asyncio.sleep(0.001)
    finally:
        await db.dispose()


async def test_concurrent_appends_from_two_processes_never_fork(db: Database) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WORKERS)
    processes = [
        ctx.Process(target=_append_worker, args=(db.url, w, PER_WORKER, start))
        for w in range(WORKERS)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            await asyncio.to_thread(process.join, 120)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert [p.exitcode for p in processes] == [0] * WORKERS

    async with db.read_transaction() as session:
        rows = (
            await session.execute(select(AuditRow.seq, AuditRow.workflow_id).order_by(AuditRow.seq))
        ).all()
    assert [seq for seq, _ in rows] == list(range(1, WORKERS * PER_WORKER + 1))
    owners = [workflow for _, workflow in rows]
    assert sorted(set(owners)) == [f"wf-{w}" for w in range(WORKERS)]
    # They really ran at the same time: each started before the other finished.
    for w in range(WORKERS):
        mine = [i for i, owner in enumerate(owners) if owner == f"wf-{w}"]
        others = [i for i, owner in enumerate(owners) if owner != f"wf-{w}"]
        assert len(mine) == PER_WORKER
        assert mine[0] < others[-1]
    report = await verify(db)
    assert (report.ok, report.rows) == (True, WORKERS * PER_WORKER)
