"""Scoring a campaign's customer with the champion of each model, challengers in shadow."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.campaign.audit import append_decisions, append_row
from activities.campaign.log_context import bind
from cohortflow import metrics
from cohortflow.storage import customers
from cohortflow.storage.db import Database
from scoring.scorer import Scorer, ScoringError
from workflows.campaign.activity_io import Contribution, CustomerScore, ScoreInput, ScoreResult
from workflows.campaign.contract import ActivityName, AuditKind

log = structlog.get_logger(__name__)

Row = dict[str, float | None]


@dataclass(frozen=True)
class Scored:
    """What the score step found: the result the workflow gets, and the challengers'
    shadow scores (or errors) by model, for the audit row only."""

    result: ScoreResult
    shadow: dict[str, dict[str, Any]]


class ScoringActivities:
    """Scores customers from their stored features."""

    def __init__(self, db: Database, scorer: Scorer) -> None:
        self._db = db
        self._scorer = scorer

    @activity.defn(name=ActivityName.SCORE_CUSTOMER)
    async def score_customer(self, inp: ScoreInput) -> ScoreResult:
        """Score customers with the champion of each model and audit scores and reasons.

        A customer without features, or a model that cannot score (missing, corrupt), is a
        non-retryable ``ScoringError``: the campaign's business failure, not an outage.
        """
        customer_key = inp.customer_keys[0] if inp.customer_keys else ""
        bind(inp.workflow_id, customer_key)
        # Features true today, by this machine's clock: the clock their events were stamped
        # by (a time-skipping test server's clock runs ahead of both).
        at = datetime.now(UTC)
        scored = await metrics.timed("cohortflow_scoring_seconds", "Score", self.score(inp, at))
        result = scored.result
        day = at.date().isoformat()
        async with self._db.transaction() as session:
            # A campaign scores its one customer; a batch from elsewhere carries no decisions.
            await append_decisions(
                session, inp.workflow_id, inp.campaign_id, customer_key, inp.decisions
            )
            for i, customer in enumerate(result.customers):
                await append_row(
                    session,
                    inp.workflow_id,
                    inp.step_id,
                    AuditKind.SCORED,
                    inp.campaign_id,
                    customer.customer_key,
                    _scored_payload(result, customer, scored.shadow, i) | {"features_as_of": day},
                )
        log.info("scored", models=result.model_versions)
        result.decisions_recorded = len(inp.decisions)
        return result

    async def score(self, inp: ScoreInput, at: datetime) -> Scored:
        """The step's own work, writing nothing: read the customers' features as of ``at``,
        score them with each model's champion (with top reasons) and challenger (shadow).

        Raises the non-retryable ``ScoringError`` that :meth:`score_customer` does.
        """
        # A read of its own: it never queues for the write lock that every other
        # activity's transaction takes; on a SQLite file it is a point read on this thread.
        features = await customers.read_features(self._db, inp.customer_keys, at)
        missing = [k for k in inp.customer_keys if k not in features]
        if missing:
            raise ApplicationError(
                f"no features stored for {len(missing)} customer(s)",
                type="ScoringError",
                non_retryable=True,
            )
        rows = [features[k] for k in inp.customer_keys]
        # On the event loop: a campaign's one row scores in a fraction of a millisecond,
        # less than the hop to a thread and back (which under load cost milliseconds at
        # p99). A model version's first load, once per process, blocks it for longer.
        result = self._score(inp, rows)
        return Scored(result, self._shadow_scores(inp.models, rows))

    def _score(self, inp: ScoreInput, rows: list[Row]) -> ScoreResult:
        try:
            batches = [self._scorer.score(model, rows) for model in inp.models]
        except ScoringError as exc:
            raise ApplicationError(
                f"{type(exc).__name__}: {exc}", type="ScoringError", non_retryable=True
            ) from exc
        return ScoreResult(
            model_versions={b.model: b.version for b in batches},
            customers=[
                CustomerScore(
                    customer_key=key,
                    scores={b.model: float(b.scores[i]) for b in batches},
                    features={n: float(v) for n, v in rows[i].items() if v is not None},
                    top_contributions={
                        b.model: [Contribution(f, float(v)) for f, v in b.contributions[i]]
                        for b in batches
                    },
                )
                for i, key in enumerate(inp.customer_keys)
            ],
        )

    def _shadow_scores(self, models: list[str], rows: list[Row]) -> dict[str, dict[str, Any]]:
        """Challengers score in shadow: audited for comparison, never returned to the
        workflow, and a broken challenger never fails the step."""
        found: dict[str, dict[str, Any]] = {}
        for model in models:
            version: str | None = None
            try:
                version = self._scorer.challenger_version(model)
                if version is not None:
                    batch = self._scorer.score(model, rows, version=version, top_k=0)
                    found[model] = {"version": batch.version, "scores": batch.scores}
            except ScoringError as exc:
                found[model] = {"version": version, "error": f"{type(exc).__name__}: {exc}"}
        return found


def _scored_payload(
    result: ScoreResult, customer: CustomerScore, shadow: dict[str, dict[str, Any]], index: int
) -> dict[str, Any]:
    # The values of the features that weighed most, so the trail can say why in words.
    weighed = {c.feature for cs in customer.top_contributions.values() for c in cs}
    return {
        "scores": customer.scores,
        "model_versions": result.model_versions,
        "top_contributions": {
            m: [asdict(c) for c in cs] for m, cs in customer.top_contributions.items()
        },
        "features": {f: v for f, v in customer.features.items() if f in weighed},
        "shadow": {
            m: {"version": sh["version"], "score": sh["scores"][index]} if "scores" in sh else sh
            for m, sh in shadow.items()
        },
    }
