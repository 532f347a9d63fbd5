"""Model endpoints: the registry's versions and the drift of the feature store."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from cohortflow.api.auth import guard
from cohortflow.auth import policy
from cohortflow.model_drift import store_drift
from cohortflow.settings import Settings
from scoring.drift import DEFAULT_THRESHOLD
from scoring.registry import ModelRegistry


def models_router(settings: Settings) -> APIRouter:
    """``GET /v1/models`` and ``GET /v1/models/drift`` over ``settings``' registry and store."""
    router = APIRouter(prefix="/v1/models", tags=["models"])
    registry = ModelRegistry(settings.resolved_models_dir)

    @router.get("", **guard(policy.READ, "read models"))
    async def list_models() -> list[dict[str, Any]]:
        """Every registered version with its holdout metrics and role."""
        infos = await asyncio.to_thread(registry.list)
        roles = {
            name: (registry.champion_version(name), registry.challenger_version(name))
            for name in {i.name for i in infos}
        }
        return [
            {
                "model": i.name,
                "version": i.version,
                "champion": i.version == roles[i.name][0],
                "challenger": i.version == roles[i.name][1],
                "created_at": i.created_at.isoformat(),
                "metrics": {k: v for k, v in i.metrics.items() if k != "calibration"},
                "promoted_by": i.promoted_by,
            }
            for i in infos
        ]

    @router.get("/drift", **guard(policy.READ, "read models", {404: "no champion model"}))
    async def drift(
        model: Annotated[Literal["churn", "propensity"], Query()] = "churn",
        threshold: Annotated[float, Query(ge=0.0)] = DEFAULT_THRESHOLD,
    ) -> dict[str, Any]:
        """PSI per feature and for the score, the store now vs the champion's training;
        ``flagged`` lists those past ``threshold``. 404 without a champion."""
        report = await store_drift(settings.resolved_database_url, registry, model, threshold)
        return report.to_dict()

    return router
