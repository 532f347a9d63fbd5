"""The scheduled cohort evaluation's activity: evaluate, signal exits, start launches."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from cohortflow.cohorts.service import CohortService
from cohortflow.errors import NotFound
from workflows.cohort_evaluation import (
    EVALUATE_ACTIVITY,
    CohortEvaluationInput,
    CohortEvaluationResult,
)


class CohortEvaluationActivities:
    """Runs :meth:`CohortService.evaluate` for the scheduled workflow."""

    def __init__(self, service: CohortService) -> None:
        self._service = service

    @activity.defn(name=EVALUATE_ACTIVITY)
    async def evaluate_cohort(self, params: CohortEvaluationInput) -> CohortEvaluationResult:
        """Evaluate the cohort in full; a cohort that no longer exists is not retried."""
        try:
            report = await self._service.evaluate(params.cohort_id)
        except NotFound as exc:
            raise ApplicationError(str(exc), type="CohortNotFound", non_retryable=True) from exc
        diff = report.evaluation.diff
        return CohortEvaluationResult(
            cohort_id=params.cohort_id,
            entered=len(diff.entered),
            exited=len(diff.exited),
            members=diff.members,
            launches=len(report.launches),
            temporal=report.temporal,
        )
