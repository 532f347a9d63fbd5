"""The synthetic generator: deterministic, and its features equal the ingestion path's."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import delete, func, select

from cohortflow.events.ingest import Ingestor
from cohortflow.events.synth import event_documents, generate, store
from cohortflow.storage.db import Database
from cohortflow.storage.feature_store import recompute_all
from cohortflow.storage.tables import Customer, CustomerFeatures, Event
from tests.test_events import PSEUDONYMISER, features_table


def test_same_seed_same_population_other_seed_another() -> None:
    a, b, c = generate(500, 5_000, seed=4), generate(500, 5_000, seed=4), generate(500, 5_000, 5)
    assert np.array_equal(a.day, b.day) and np.array_equal(a.amount, b.amount)
    assert not np.array_equal(a.day[:100], c.day[:100])
    assert 4_000 < a.events < 6_000
    assert len(set(a.customer.tolist())) == 500  # everyone did something


async def test_stored_features_equal_a_recompute_from_the_stored_events(db: Database) -> None:
    data = generate(200, 3_000, seed=9)
    await store(db, data, PSEUDONYMISER)
    generated = await features_table(db)
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Event)) == data.events
        assert await session.scalar(select(func.count()).select_from(Customer)) == 200
        await session.execute(delete(CustomerFeatures))
    assert await recompute_all(db) == 200
    recomputed = await features_table(db)
    assert set(recomputed) == set(generated)
    for key, (values, as_of) in generated.items():
        other, other_as_of = recomputed[key]
        assert other_as_of == as_of
        assert set(other) == set(values), key
        for name, value in values.items():
            assert other[name] == (None if value is None else pytest.approx(value)), (key, name)


async def test_synthetic_events_pass_the_api_validation(db: Database) -> None:
    data = generate(20, 300, seed=2)
    outcome = await Ingestor(db, PSEUDONYMISER).ingest(list(event_documents(data)))
    assert outcome.count("accepted") == data.events
