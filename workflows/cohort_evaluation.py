"""CohortEvaluationWorkflow: one full evaluation of a cohort, started by its Schedule.

Each cohort has a Temporal Schedule (``cohortflow.cohorts.schedules``) that starts this
workflow every ``evaluate_every``; operators see, pause and resume it in the Temporal UI or
with ``cohortflow cohort pause|resume``. The evaluation itself is one activity: it stores
who entered and left, signals exits and starts the bulk launches, all idempotent, so a
retried attempt repeats nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

EVALUATION_WORKFLOW = "CohortEvaluationWorkflow"
EVALUATE_ACTIVITY = "evaluate_cohort"


@dataclass
class CohortEvaluationInput:
    """The cohort to evaluate."""

    cohort_id: str


@dataclass
class CohortEvaluationResult:
    """What the evaluation changed and started."""

    cohort_id: str
    entered: int
    exited: int
    members: int
    launches: int
    temporal: str


@workflow.defn(name=EVALUATION_WORKFLOW)
class CohortEvaluationWorkflow:
    """Evaluates one cohort in full and reports what changed."""

    @workflow.run
    async def run(self, params: CohortEvaluationInput) -> CohortEvaluationResult:
        """Run the evaluation activity; retried on infrastructure failures."""
        workflow.set_current_details(f"**evaluating** cohort `{params.cohort_id}`")
        result: CohortEvaluationResult = await workflow.execute_activity(
            EVALUATE_ACTIVITY,
            params,
            result_type=CohortEvaluationResult,
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=60)
            ),
            summary=f"evaluate {params.cohort_id}",
        )
        workflow.set_current_details(
            f"**done**: `{result.cohort_id}` has {result.members} members; "
            f"{result.entered} entered, {result.exited} left, {result.launches} launches started."
        )
        return result
