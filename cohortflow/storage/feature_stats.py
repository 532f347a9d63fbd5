"""Whole-population reads of the feature store, for distribution checks such as drift."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage.tables import CustomerFeatures


async def all_feature_vectors(session: AsyncSession) -> list[dict[str, float | None]]:
    """Every stored feature vector, in customer-key order (keys are not needed for PSI)."""
    result = await session.execute(
        select(CustomerFeatures.features).order_by(CustomerFeatures.customer_key)
    )
    return [dict(features) for (features,) in result]
