"""Helpers shared by the storage modules: canonical JSON, UTC clocks, dialect-aware upserts."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage.tables import Base

T = TypeVar("T")

# Bound parameters one statement may carry: asyncpg's protocol allows 32767; SQLite allows
# 32766 since 3.32 and 999 before.
_MAX_PARAMS = {
    "postgresql": 32_000,
    "sqlite": 32_000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999,
}
# Beyond this, compiling one huge multi-row statement costs more than another round trip.
_MAX_ROWS_PER_STATEMENT = 1_000

Insert = postgresql.Insert | sqlite.Insert


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value``: sorted keys, no whitespace, UTF-8 kept, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def utc(now: datetime | None = None) -> datetime:
    """``now`` in UTC (the current time when None); naive datetimes are refused."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: pass a timezone-aware datetime")
    return now.astimezone(UTC)


def dialect_name(session: AsyncSession) -> str:
    """The dialect the session is bound to: ``sqlite`` or ``postgresql``."""
    return session.get_bind().dialect.name


def table_of(entity: type[Base]) -> Table:
    """The Core table of a mapped class, for statements that skip the ORM's per-row work."""
    return cast(Table, entity.__table__)


def upsert(session: AsyncSession, entity: type[Base] | Table) -> Insert:
    """An INSERT supporting ``ON CONFLICT`` for the session's dialect. On a ``Table`` it is a
    plain Core statement, cheaper than the ORM's for many rows at once."""
    name = dialect_name(session)
    if name == "postgresql":
        return postgresql.insert(entity)
    if name == "sqlite":
        return sqlite.insert(entity)
    raise NotImplementedError(f"unsupported dialect {name!r}")


def rows_per_statement(session: AsyncSession, params_per_row: int) -> int:
    """How many rows of ``params_per_row`` parameters fit in one statement."""
    budget = _MAX_PARAMS.get(dialect_name(session), 999)
    return max(1, min(_MAX_ROWS_PER_STATEMENT, budget // params_per_row))


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def in_list(items: Sequence[T], size: int = 1_024) -> Iterator[list[T]]:
    """Slices of ``items`` for ``IN (...)`` lists, each padded (repeating its last item,
    which changes no answer) to a power of two: the database sees a few statement shapes
    and reuses their plans, instead of parsing and planning one for every list length."""
    for chunk in chunked(items, size):
        padded = list(chunk)
        padded += [padded[-1]] * ((1 << (len(padded) - 1).bit_length()) - len(padded))
        yield padded
