"""Cohort definitions, current members and the entered/exited transitions between them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import canonical_json, chunked, rows_per_statement, upsert, utc
from cohortflow.storage.tables import Cohort, CohortMember, CohortRefresh, CohortTransition

ENTERED = "entered"
EXITED = "exited"


async def save_cohort(
    session: AsyncSession,
    cohort_id: str,
    definition: dict[str, Any],
    *,
    now: datetime | None = None,
) -> tuple[int, bool]:
    """Store a cohort definition; a changed one gets the next version. Returns (version, changed).

    Members stay: the next evaluation diffs them against the new rule.
    """
    at = utc(now)
    document = json.loads(canonical_json(definition))
    created = await session.execute(
        upsert(session, Cohort)
        .values(cohort_id=cohort_id, definition=document, version=1, updated_at=at)
        .on_conflict_do_nothing(index_elements=[Cohort.cohort_id])
        .returning(Cohort.cohort_id)
    )
    if created.first() is not None:
        return 1, True
    row = (
        await session.execute(
            select(Cohort.version, Cohort.definition)
            .where(Cohort.cohort_id == cohort_id)
            .with_for_update()
        )
    ).one()
    if canonical_json(row.definition) == canonical_json(document):
        return row.version, False
    version = row.version + 1
    await session.execute(
        update(Cohort)
        .where(Cohort.cohort_id == cohort_id)
        .values(definition=document, version=version, updated_at=at)
    )
    return version, True


async def get_cohort(session: AsyncSession, cohort_id: str) -> Cohort | None:
    """The cohort, or None."""
    return await session.get(Cohort, cohort_id)


async def list_cohorts(session: AsyncSession) -> list[tuple[Cohort, int]]:
    """Every cohort with its current member count, by id."""
    counts = dict(
        (
            await session.execute(
                select(CohortMember.cohort_id, func.count()).group_by(CohortMember.cohort_id)
            )
        ).all()
    )
    cohorts = await session.scalars(select(Cohort).order_by(Cohort.cohort_id))
    return [(c, int(counts.get(c.cohort_id, 0))) for c in cohorts]


async def member_keys(
    session: AsyncSession, cohort_id: str, among: set[str] | None = None
) -> set[str]:
    """The current members' customer keys (those of ``among`` only, when given)."""
    query = select(CohortMember.customer_key).where(CohortMember.cohort_id == cohort_id)
    if among is None:
        return set(await session.scalars(query))
    found: set[str] = set()
    for chunk in chunked(sorted(among), rows_per_statement(session, 1)):
        found |= set(await session.scalars(query.where(CohortMember.customer_key.in_(chunk))))
    return found


async def members_page(
    session: AsyncSession, cohort_id: str, *, after: str = "", limit: int = 100
) -> list[CohortMember]:
    """Current members in key order, after ``after``."""
    result = await session.scalars(
        select(CohortMember)
        .where(CohortMember.cohort_id == cohort_id, CohortMember.customer_key > after)
        .order_by(CohortMember.customer_key)
        .limit(limit)
    )
    return list(result)


@dataclass(frozen=True)
class Diff:
    """What one evaluation changed."""

    entered: list[str]
    exited: list[str]
    members: int
    first_seq: int | None  # the first transition this evaluation stored
    last_seq: int | None  # and the last one


async def apply_membership(
    session: AsyncSession,
    cohort_id: str,
    new_members: set[str],
    *,
    evaluation_id: str,
    now: datetime | None = None,
    among: set[str] | None = None,
) -> Diff:
    """Make ``new_members`` the cohort's members and record who entered and who left; with
    ``among``, only those customers were evaluated and only their membership changes.

    Locks the cohort's row first, so concurrent evaluations of one cohort serialise and
    never record the same entry twice. Entries are stored before exits, each in key order.
    """
    at = utc(now)
    await session.execute(
        select(Cohort.cohort_id).where(Cohort.cohort_id == cohort_id).with_for_update()
    )
    current = await member_keys(session, cohort_id, among)
    entered = sorted(new_members - current)
    exited = sorted(current - new_members)
    transitions = [
        {
            "cohort_id": cohort_id,
            "customer_key": key,
            "kind": kind,
            "evaluation_id": evaluation_id,
            "at": at,
        }
        for kind, keys in ((ENTERED, entered), (EXITED, exited))
        for key in keys
    ]
    first_seq = last_seq = None
    if transitions:
        before = await session.scalar(select(func.max(CohortTransition.seq)))
        for chunk in chunked(transitions, rows_per_statement(session, 5)):
            await session.execute(insert(CohortTransition), list(chunk))
        first_seq = int(before or 0) + 1
        last_seq = int(await session.scalar(select(func.max(CohortTransition.seq))) or 0)
    members = [{"cohort_id": cohort_id, "customer_key": k, "entered_at": at} for k in entered]
    for chunk in chunked(members, rows_per_statement(session, 3)):
        await session.execute(insert(CohortMember), list(chunk))
    for keys in chunked(exited, rows_per_statement(session, 1)):
        await session.execute(
            delete(CohortMember).where(
                CohortMember.cohort_id == cohort_id, CohortMember.customer_key.in_(keys)
            )
        )
    await session.execute(
        update(Cohort).where(Cohort.cohort_id == cohort_id).values(evaluated_at=at)
    )
    size = len(new_members)
    if among is not None:  # the whole cohort's size, not the evaluated part's
        count = select(func.count()).where(CohortMember.cohort_id == cohort_id)
        size = int(await session.scalar(count) or 0)
    return Diff(entered, exited, size, first_seq, last_seq)


async def transitions_page(
    session: AsyncSession,
    cohort_id: str,
    kind: str,
    *,
    after_seq: int,
    up_to_seq: int,
    limit: int,
) -> list[CohortTransition]:
    """Transitions of one kind with ``after_seq < seq <= up_to_seq``, in order."""
    result = await session.scalars(
        select(CohortTransition)
        .where(
            CohortTransition.cohort_id == cohort_id,
            CohortTransition.kind == kind,
            CohortTransition.seq > after_seq,
            CohortTransition.seq <= up_to_seq,
        )
        .order_by(CohortTransition.seq)
        .limit(limit)
    )
    return list(result)


async def last_transition_seq(session: AsyncSession, cohort_id: str, kind: str) -> int | None:
    """The sequence number of the cohort's latest transition of one kind; None if none."""
    seq = await session.scalar(
        select(func.max(CohortTransition.seq)).where(
            CohortTransition.cohort_id == cohort_id, CohortTransition.kind == kind
        )
    )
    return None if seq is None else int(seq)


async def count_transitions(
    session: AsyncSession, cohort_id: str, kind: str, *, after_seq: int = 0, up_to_seq: int
) -> int:
    """How many transitions of one kind lie in ``(after_seq, up_to_seq]``."""
    count = await session.scalar(
        select(func.count())
        .select_from(CohortTransition)
        .where(
            CohortTransition.cohort_id == cohort_id,
            CohortTransition.kind == kind,
            CohortTransition.seq > after_seq,
            CohortTransition.seq <= up_to_seq,
        )
    )
    return int(count or 0)


async def history(session: AsyncSession, customer_key: str) -> Sequence[CohortTransition]:
    """Every transition of one customer, oldest first."""
    result = await session.scalars(
        select(CohortTransition)
        .where(CohortTransition.customer_key == customer_key)
        .order_by(CohortTransition.seq)
    )
    return list(result)


async def touch(session: AsyncSession, keys: Sequence[str], *, now: datetime) -> None:
    """Queue customers for re-evaluation by every cohort (their events changed)."""
    rows = [{"customer_key": key, "touched_at": utc(now)} for key in sorted(set(keys))]
    if rows:
        stmt = upsert(session, CohortRefresh)
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[CohortRefresh.customer_key],
                set_={"touched_at": stmt.excluded.touched_at},
            ),
            rows,
        )


async def touched(session: AsyncSession, limit: int) -> list[tuple[str, datetime]]:
    """Up to ``limit`` queued customers, longest waiting first, with when they were touched."""
    result = await session.execute(
        select(CohortRefresh.customer_key, CohortRefresh.touched_at)
        .order_by(CohortRefresh.touched_at, CohortRefresh.customer_key)
        .limit(limit)
    )
    return [(key, at) for key, at in result]


async def refreshed(session: AsyncSession, claimed: Sequence[tuple[str, datetime]]) -> None:
    """Dequeue customers re-evaluated as of their claimed touch; one touched again since
    stays queued."""
    for key, at in claimed:
        await session.execute(
            delete(CohortRefresh).where(
                CohortRefresh.customer_key == key, CohortRefresh.touched_at <= utc(at)
            )
        )


async def evaluated_cohorts(session: AsyncSession) -> list[str]:
    """Cohorts evaluated in full at least once: the ones the incremental path keeps."""
    result = await session.scalars(
        select(Cohort.cohort_id).where(Cohort.evaluated_at.is_not(None)).order_by(Cohort.cohort_id)
    )
    return list(result)
