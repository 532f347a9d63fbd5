"""A seeded synthetic population: customers, their events and the features those events give.

Realistic enough for benchmarks: customers sign up over two years, are active for a
heavy-tailed time, browse, open e-mails and buy (log-normal baskets) at a per-customer
rate. Everything is drawn with numpy in whole arrays, so 1M customers and 10M events take
seconds to generate; features are computed the same vectorised way and equal what the
ingestion path computes from the same events (a test checks).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import insert

from cohortflow.events.features import (
    ACTIVITY_WINDOW_DAYS,
    COUNT_PREFIX,
    DAYS_SINCE_PREFIX,
    as_of_instant,
)
from cohortflow.events.rollup import PURCHASE
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage._sql import chunked, rows_per_statement
from cohortflow.storage.customers import upsert_features
from cohortflow.storage.db import Database
from cohortflow.storage.tables import Customer, Event
from scoring.features import FEATURE_NAMES, RECENT_WINDOW_DAYS

EVENT_TYPES = ("page_view", "email_open", PURCHASE)
EVENT_WEIGHTS = (0.6, 0.25, 0.15)
START = date(2024, 1, 1)
SPAN_DAYS = 730


@dataclass
class Synthetic:
    """A generated population: one row per customer, one per event (sorted by customer)."""

    user_ids: list[str]
    customer: npt.NDArray[np.int64]  # per event: index into user_ids
    day: npt.NDArray[np.int64]  # per event: days since START
    second: npt.NDArray[np.int64]  # per event: second of that day
    kind: npt.NDArray[np.int64]  # per event: index into EVENT_TYPES
    amount: npt.NDArray[np.float64]  # per event: basket value (purchases only, else 0)
    quantity: npt.NDArray[np.int64]  # per event: items (purchases only, else 0)
    seed: int

    @property
    def events(self) -> int:
        """How many events."""
        return len(self.customer)


def generate(customers: int, events: int, seed: int = 0) -> Synthetic:
    """About ``events`` events over ``customers`` customers, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    signup = rng.integers(0, SPAN_DAYS - 30, customers)
    # Heavy-tailed activity: most customers lapse within months, some stay for years.
    active = np.minimum(rng.exponential(180, customers).astype(np.int64) + 1, SPAN_DAYS - signup)
    rate = rng.gamma(1.5, 1.0, customers)
    weight = rate * active
    counts = rng.poisson(weight / weight.sum() * events)
    counts = np.maximum(counts, 1)  # everyone did something once
    customer = np.repeat(np.arange(customers, dtype=np.int64), counts)
    n = len(customer)
    day = signup[customer] + (rng.random(n) * active[customer]).astype(np.int64)
    second = rng.integers(0, 86_400, n)
    kind = rng.choice(len(EVENT_TYPES), n, p=list(EVENT_WEIGHTS))
    bought = kind == EVENT_TYPES.index(PURCHASE)
    amount = np.where(bought, np.round(rng.lognormal(3.2, 0.8, n), 2), 0.0)
    quantity = np.where(bought, rng.integers(1, 4, n), 0)
    return Synthetic(
        [f"s{seed}-{i:07d}" for i in range(customers)],
        customer,
        day,
        second,
        kind,
        amount,
        quantity,
        seed,
    )


def features(data: Synthetic) -> Iterator[tuple[int, dict[str, float | None], date]]:
    """Per customer (by index): the features ``compute_features`` gives for its events."""
    frame = pd.DataFrame(
        {
            "c": data.customer,
            "day": data.day,
            "kind": data.kind,
            "amount": data.amount,
            "qty": data.quantity,
        }
    )
    as_of = frame.groupby("c")["day"].max()
    frame["as_of"] = as_of.reindex(frame["c"]).to_numpy()
    events_total = frame.groupby("c").size()
    events_30d = (
        frame[frame["day"] > frame["as_of"] - ACTIVITY_WINDOW_DAYS].groupby("c").size()
    ).reindex(as_of.index, fill_value=0)
    per_kind = frame.groupby(["c", "kind"])["day"].agg(["size", "max"])
    buys = frame[frame["kind"] == EVENT_TYPES.index(PURCHASE)]
    days = buys.groupby(["c", "day"]).agg(amount=("amount", "sum"), qty=("qty", "sum"))
    days = days.reset_index()
    days["as_of"] = as_of.reindex(days["c"]).to_numpy()
    days["recent"] = days["day"] > days["as_of"] - RECENT_WINDOW_DAYS
    days["recent_amount"] = days["amount"].where(days["recent"], 0.0)
    rfm = days.groupby("c").agg(
        first=("day", "min"),
        last=("day", "max"),
        n=("day", "size"),
        total=("amount", "sum"),
        qty=("qty", "sum"),
        recent=("recent", "sum"),
        recent_amount=("recent_amount", "sum"),
    )
    kinds: dict[int, list[tuple[str, int, int]]] = {}
    for (c, k), size, last in per_kind.itertuples(name=None):
        kinds.setdefault(int(c), []).append((EVENT_TYPES[int(k)], int(size), int(last)))
    rfm_rows = {int(c): row for c, *row in rfm.itertuples(name=None)}
    for c, day_of in as_of.items():
        values: dict[str, float | None] = dict.fromkeys(FEATURE_NAMES)
        row = rfm_rows.get(int(c))
        if row is not None:
            first, last, n, total, qty, recent, recent_amount = row
            frequency = n - 1
            tenure = last - first
            values |= {
                "recency_days": float(day_of - last),
                "frequency": float(frequency),
                "tenure_days": float(tenure),
                "age_days": float(day_of - first),
                "monetary_total": float(total),
                "monetary_avg": float(total) / n,
                "cds_total": float(qty),
                "purchases_90d": float(recent),
                "monetary_90d": float(recent_amount),
                "mean_interpurchase_days": tenure / frequency if frequency else None,
            }
        values["events_total"] = float(events_total[c])
        values["events_30d"] = float(events_30d[c])
        for name, size, last in sorted(kinds[int(c)]):
            values[COUNT_PREFIX + name] = float(size)
            values[DAYS_SINCE_PREFIX + name] = float(day_of - last)
        yield int(c), values, START + timedelta(days=int(day_of))


_EPOCH = datetime.combine(START, datetime.min.time(), tzinfo=UTC)


def _instant(data: Synthetic, j: int) -> datetime:
    return _EPOCH + timedelta(days=int(data.day[j]), seconds=int(data.second[j]))


def _properties(data: Synthetic, j: int) -> dict[str, Any]:
    if EVENT_TYPES[int(data.kind[j])] != PURCHASE:
        return {}
    return {"amount": float(data.amount[j]), "quantity": int(data.quantity[j])}


def event_documents(data: Synthetic) -> Iterator[dict[str, Any]]:
    """The events as Segment-style ``track`` documents (for the API and JSONL import)."""
    for j in range(data.events):
        yield {
            "type": "track",
            "messageId": f"synth-{data.seed}-{j}",
            "userId": data.user_ids[int(data.customer[j])],
            "event": EVENT_TYPES[int(data.kind[j])],
            "timestamp": _instant(data, j).isoformat(),
            "properties": _properties(data, j),
        }


def write_jsonl(data: Synthetic, path: str) -> int:
    """Write the events as JSONL; returns how many."""
    with open(path, "w", encoding="utf-8") as f:
        for document in event_documents(data):
            f.write(json.dumps(document) + "\n")
    return data.events


async def store(
    db: Database,
    data: Synthetic,
    pseudonymiser: Pseudonymiser,
    *,
    with_events: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> None:
    """Write customers, (optionally) events and features straight to the database.

    Bypasses the API for speed; what it writes equals what ingesting the same events
    through the API would, except that no campaign is signalled.
    """
    keys = [pseudonymiser.customer_key(u) for u in data.user_ids]
    now = datetime.now(UTC)
    customer_rows = (
        {
            "customer_key": key,
            "source_id": user,
            "email": f"{user}@example.com",
            "timezone": "UTC",
            "attributes": {},
            "created_at": now,
        }
        for key, user in zip(keys, data.user_ids, strict=True)
    )
    await _insert_stream(db, Customer, customer_rows, 6, "customers", progress)
    if with_events:
        rows = (
            {
                "message_id": f"synth-{data.seed}-{j}",
                "customer_key": keys[int(data.customer[j])],
                "type": "track",
                "event": EVENT_TYPES[int(data.kind[j])],
                "occurred_at": _instant(data, j),
                "received_at": now,
                "properties": _properties(data, j),
            }
            for j in range(data.events)
        )
        await _insert_stream(db, Event, rows, 7, "events", progress)
    feature_rows = ((keys[c], values, as_of_instant(day)) for c, values, day in features(data))
    page: list[tuple[str, dict[str, float | None], datetime]] = []

    async def flush() -> None:
        async with db.transaction() as session:
            await upsert_features(session, page, now=now)
        if progress is not None:
            progress("features", len(page))
        page.clear()

    for row in feature_rows:
        page.append(row)
        if len(page) >= 20_000:
            await flush()
    if page:
        await flush()


async def _insert_stream(
    db: Database,
    table: type[Customer] | type[Event],
    rows: Iterator[dict[str, Any]],
    params_per_row: int,
    label: str,
    progress: Callable[[str, int], None] | None,
    page_size: int = 20_000,
) -> None:
    """Insert in transactions of ``page_size`` rows, multi-row statements inside."""
    while True:
        page = [row for _, row in zip(range(page_size), rows, strict=False)]
        if not page:
            return
        async with db.transaction() as session:
            for chunk in chunked(page, rows_per_statement(session, params_per_row)):
                await session.execute(insert(table), list(chunk))
        if progress is not None:
            progress(label, len(page))
