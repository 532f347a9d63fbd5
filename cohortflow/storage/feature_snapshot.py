"""A columnar snapshot of ``customer_features`` for whole-population reads, with the
customers changed since it read from the operational copy.

``customer_features`` (one JSON vector per customer, in SQLite or PostgreSQL) stays the
operational copy: ingestion writes it in the transaction that stores the events, and every
per-customer reader uses it. A full cohort evaluation reads every customer but only the
features its rule names, which a row store cannot do cheaply at millions of rows, so it
reads a Parquet file instead: one typed column per feature, written by DuckDB, registered in
``feature_snapshot`` under a fresh id. Every write or delete of a customer's features
appends the key to ``feature_changes`` in the same transaction; a reader takes the snapshot
minus those customers plus their current rows, so it sees exactly what the operational copy
holds.

Taking a snapshot reads the highest change ``seq`` first, then every row, then registers the
file and deletes the changes up to that ``seq``: a change made meanwhile keeps its row and
is read from the operational copy. On PostgreSQL a sequence value can commit after a higher
one, so writers hold a shared advisory lock while they log a change and the snapshot takes it
exclusively to read the highest ``seq``: every change at or below it has committed. SQLite
has one writer at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
from sqlalchemy import ColumnElement, Text, cast, delete, extract, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, dialect_name, rows_per_statement, upsert
from cohortflow.storage.db import Database
from cohortflow.storage.tables import CustomerFeatures, FeatureChange, FeatureSnapshotRow

# Guards reading the highest change seq against changes not yet committed (PostgreSQL).
CHANGE_LOCK_ID = 0x636F686F66656174  # "cohofeat"
EXPORT_PAGE = 100_000
# DuckDB's working memory while taking a snapshot; beyond it, it spills to the directory.
EXPORT_MEMORY = "1GB"
_SLOT = 1
_SECONDS_PER_DAY = 86_400
_JULIAN_DAY_OF_EPOCH = 2_440_587.5
EPOCH_DATE = date(1970, 1, 1)


@dataclass(frozen=True)
class Snapshot:
    """A registered snapshot file and the column holding each feature."""

    snapshot_id: str
    path: Path
    customers: int
    columns: dict[str, str]  # feature name -> column name in the file


def default_directory(url: str) -> Path:
    """Where a database's snapshots live when the caller names no directory: beside a
    SQLite file, else a per-database directory under the system's temporary directory."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:"):
        return Path(database).expanduser().resolve().parent / (Path(database).name + ".features")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "cohortflow-features" / digest


def epoch_day(session: AsyncSession, column: Any) -> ColumnElement[Any]:
    """Days since 1970-01-01 of a UTC timestamp column, computed by the database (parsing
    millions of timestamps in Python would dominate a full read)."""
    if dialect_name(session) == "sqlite":
        return func.julianday(column) - _JULIAN_DAY_OF_EPOCH
    return extract("epoch", column) / _SECONDS_PER_DAY


async def mark_changed(session: AsyncSession, keys: Sequence[str]) -> None:
    """Log that these customers' features were written or deleted (in the caller's
    transaction), so readers of the snapshot take them from the operational copy."""
    if not keys:
        return
    if dialect_name(session) == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock_shared(:id)"), {"id": CHANGE_LOCK_ID}
        )
    rows = [{"customer_key": key} for key in dict.fromkeys(keys)]
    for chunk in chunked(rows, rows_per_statement(session, 1)):
        await session.execute(insert(FeatureChange), list(chunk))


async def registered(session: AsyncSession, directory: Path) -> Snapshot | None:
    """The registered snapshot, if its file exists in ``directory``."""
    row = await session.get(FeatureSnapshotRow, _SLOT)
    if row is None:
        return None
    path = directory / f"{row.snapshot_id}.parquet"
    if not path.exists():  # another machine's snapshot, or a wiped directory
        return None
    names = list(row.columns)
    return Snapshot(row.snapshot_id, path, row.customers, {n: f"f{i}" for i, n in enumerate(names)})


async def changed_keys(session: AsyncSession) -> list[str]:
    """Customers whose features changed since the registered snapshot, in key order."""
    result = await session.scalars(select(FeatureChange.customer_key).distinct())
    return sorted(result)


async def take(db: Database, directory: Path) -> Snapshot:
    """Write a snapshot of every customer's features to ``directory`` and register it."""
    async with db.transaction() as session:
        if db.dialect == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": CHANGE_LOCK_ID})
        through = await session.scalar(select(func.max(FeatureChange.seq)))
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    snapshot_id = uuid.uuid4().hex
    path = directory / f"{snapshot_id}.parquet"
    with duckdb.connect(config=_config(directory)) as con:
        con.execute(
            "CREATE TABLE raw (customer_key VARCHAR, as_of_day INTEGER, recent VARCHAR,"
            " features VARCHAR)"
        )
        async with db.read_transaction() as session:
            query = select(
                CustomerFeatures.customer_key,
                func.floor(epoch_day(session, CustomerFeatures.as_of) + 1e-9),
                cast(CustomerFeatures.recent, Text),
                cast(CustomerFeatures.features, Text),
            ).execution_options(yield_per=EXPORT_PAGE)
            result = await session.stream(query)
            async for page in result.partitions():
                _append(con, page)
        names = _feature_names(con)
        customers = _write(con, names, path)
    await register(db, directory, snapshot_id, customers, names, through=through)
    return Snapshot(snapshot_id, path, customers, {n: f"f{i}" for i, n in enumerate(names)})


async def register(
    db: Database,
    directory: Path,
    snapshot_id: str,
    customers: int,
    names: list[str],
    *,
    through: int | None,
) -> None:
    """Make ``<directory>/<snapshot_id>.parquet`` (one ``f<i>`` column per name) the
    current snapshot, covering the changes up to ``through``; drop older files."""
    async with db.transaction() as session:
        values = {
            "slot": _SLOT,
            "snapshot_id": snapshot_id,
            "customers": customers,
            "columns": names,
            "taken_at": datetime.now(UTC),
        }
        stmt = upsert(session, FeatureSnapshotRow).values(values)
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[FeatureSnapshotRow.slot],
                set_={k: stmt.excluded[k] for k in values if k != "slot"},
            )
        )
        if through is not None:
            await session.execute(delete(FeatureChange).where(FeatureChange.seq <= through))
    _remove_old(directory, keep=directory / f"{snapshot_id}.parquet")


def _config(directory: Path) -> dict[str, str | bool | int | float | list[str]]:
    return {"memory_limit": EXPORT_MEMORY, "temp_directory": str(directory / "spill")}


def _append(con: duckdb.DuckDBPyConnection, page: Sequence[Any]) -> None:
    frame = pd.DataFrame(
        [tuple(row) for row in page], columns=["customer_key", "as_of_day", "recent", "features"]
    )
    frame["as_of_day"] = frame["as_of_day"].astype("int32")
    con.register("page", frame)
    try:
        con.execute("INSERT INTO raw SELECT * FROM page")
    finally:
        con.unregister("page")


def _feature_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT DISTINCT unnest(json_keys(features)) AS name FROM raw ORDER BY name"
    ).fetchall()
    return [str(name) for (name,) in rows]


def _write(con: duckdb.DuckDBPyConnection, names: list[str], path: Path) -> int:
    """One DOUBLE column per feature (``f<i>``, NULL when missing), sorted by key."""
    # COPY takes no parameters: names (from stored data) and the path go in as literals.
    columns = "".join(
        f", TRY_CAST(json_extract_string(features, {_literal('$.' + json.dumps(name))})"
        f" AS DOUBLE) AS f{i}"
        for i, name in enumerate(names)
    )
    partial = path.with_suffix(".partial")
    con.execute(
        "COPY (SELECT customer_key, as_of_day, coalesce(recent, 'null') <> 'null' AS has_recent,"
        f" recent{columns} FROM raw ORDER BY customer_key) TO {_literal(str(partial))}"
        " (FORMAT parquet)"
    )
    os.replace(partial, path)
    found = con.execute("SELECT count(*) FROM raw").fetchone()
    return int(found[0]) if found else 0


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _remove_old(directory: Path, keep: Path) -> None:
    """Drop snapshots but the newest two: an evaluation may still be reading the previous."""
    files = sorted(directory.glob("*.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files:
        if old != keep and old not in files[:2]:
            old.unlink(missing_ok=True)
