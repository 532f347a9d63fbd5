"""Cohorts over HTTP: apply a definition, list, show, evaluate, page through members."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from temporalio.client import Client

from cohortflow.api.auth import Who, guard
from cohortflow.api.schemas import body_schema
from cohortflow.auth import policy
from cohortflow.cohorts.rules import CohortDefinition
from cohortflow.cohorts.service import CohortService
from cohortflow.settings import Settings
from cohortflow.storage import cohorts
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect


def cohorts_router(db: Database, settings: Settings) -> APIRouter:
    """The cohort API over ``db``; evaluation signals and launches on the configured Temporal."""
    router = APIRouter(prefix="/v1/cohorts", tags=["cohorts"])
    unknown = {404: "unknown cohort"}
    clients: list[Client] = []

    async def service(*, temporal: bool = False) -> CohortService:
        if temporal and not clients:
            # Unreachable: evaluation still stores its result; the response says so.
            with contextlib.suppress(RuntimeError):
                clients.append(await connect(settings, tracing=False))
        return CohortService(db, settings, clients[0] if clients else None)

    # Any object is taken and validated by the service, whose 422 names each path; the
    # document still says what a definition is.
    definition = body_schema(CohortDefinition)

    @router.post(
        "",
        **guard(policy.ADMIN, "define cohorts", {422: "invalid definition"}, body=definition),
    )
    async def apply(document: Annotated[dict[str, Any], Body()], who: Who) -> dict[str, Any]:
        """Validate and store a definition; 422 names each offending field by path."""
        definition, version, changed = await (await service()).apply(document, who.name)
        return {"cohort_id": definition.cohort_id, "version": version, "changed": changed}

    @router.get("", **guard(policy.READ, "read cohorts"))
    async def list_all() -> list[dict[str, Any]]:
        """Every cohort with its version and member count."""
        async with db.transaction() as session:
            rows = await cohorts.list_cohorts(session)
        return [
            {
                "cohort_id": c.cohort_id,
                "version": c.version,
                "members": n,
                "evaluated_at": c.evaluated_at,
            }
            for c, n in rows
        ]

    @router.get("/{cohort_id}", **guard(policy.READ, "read cohorts", unknown))
    async def show(cohort_id: str) -> dict[str, Any]:
        """The definition; 404 if unknown."""
        definition = await (await service()).definition(cohort_id)
        return definition.model_dump(mode="json", by_alias=True)

    @router.post("/{cohort_id}/evaluate", **guard(policy.ADMIN, "evaluate cohorts", unknown))
    async def evaluate(cohort_id: str, launch: Annotated[bool, Query()] = True) -> dict[str, Any]:
        """Evaluate; store entries and exits, signal exits, start the bulk launches."""
        report = await (await service(temporal=True)).evaluate(cohort_id, launch=launch)
        diff = report.evaluation.diff
        return {
            "evaluation_id": report.evaluation.evaluation_id,
            "members": diff.members,
            "entered": len(diff.entered),
            "exited": len(diff.exited),
            "exits_signalled": report.exits_signalled,
            "temporal": report.temporal,
            "launches": [
                {"campaign_id": s.campaign_id, "workflow_id": s.workflow_id, "total": s.total}
                for s in report.launches
            ],
        }

    @router.get("/{cohort_id}/members", **guard(policy.READ, "read cohorts", unknown))
    async def members(
        cohort_id: str, after: str = "", limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> dict[str, Any]:
        """Current members in key order; pass the last key as ``after`` for the next page."""
        await (await service()).definition(cohort_id)
        async with db.transaction() as session:
            page = await cohorts.members_page(session, cohort_id, after=after, limit=limit)
        return {
            "members": [{"customer_key": m.customer_key, "entered_at": m.entered_at} for m in page],
            "next": page[-1].customer_key if len(page) == limit else None,
        }

    return router
