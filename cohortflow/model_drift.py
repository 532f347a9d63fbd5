"""Drift of the feature store against a model's training distributions, for the CLI and API."""

from __future__ import annotations

import asyncio

from cohortflow.errors import Invalid, NotFound, Unavailable
from cohortflow.storage.db import Database, current_revision
from cohortflow.storage.feature_stats import all_feature_vectors
from scoring.drift import DriftReport, champion_drift
from scoring.registry import ModelNotFound, ModelRegistry, ScoringError


async def store_drift(
    database_url: str, registry: ModelRegistry, model: str, threshold: float
) -> DriftReport:
    """Drift of the whole feature store against ``model``'s champion.

    Raises :class:`Unavailable` without a schema, :class:`NotFound` without a champion and
    :class:`Invalid` when there is nothing to compare.
    """
    if await current_revision(database_url) is None:
        raise Unavailable("the database has no cohortflow schema: run `cohortflow db upgrade`")
    db = Database(database_url)
    try:
        async with db.read_transaction() as session:
            rows = await all_feature_vectors(session)
    finally:
        await db.dispose()
    try:
        # Scoring the whole store is CPU work: keep it off the event loop.
        return await asyncio.to_thread(champion_drift, registry, model, rows, threshold)
    except ModelNotFound as exc:
        raise NotFound(str(exc), field="model") from exc
    except ScoringError as exc:
        raise Invalid(str(exc), field="model") from exc
