"""The campaign bench's hand-written baseline: a Temporal workflow with exactly the bench
campaign's side effects and no engine logic (no spec, branch, holdout, search attributes,
audit of decisions or finish), run by a worker process of its own with the same activities.

Scoring is a local activity, as the lean campaign makes it; the two CRM writes are
``crm_write`` activities on the CRM queue with the campaign's retry policies; the wait is one
durable timer. Its own module, so the workflow sandbox can import it; its worker process is
``bench._baseline_workers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.campaign.activity_io import (
        CrmWriteInput,
        CrmWriteResult,
        ScoreInput,
        ScoreResult,
    )
    from workflows.campaign.calls import CRM, SCORING
    from workflows.campaign.contract import ActivityName

SAME_EFFECTS_WORKFLOW = "BenchSameEffects"


@dataclass
class SameEffectsInput:
    """One customer's run of the hand-written workflow."""

    campaign_id: str
    customer_key: str
    cohort_id: str
    crm_task_queue: str


@workflow.defn(name=SAME_EFFECTS_WORKFLOW)
class SameEffectsWorkflow:
    """Score, label, wait 1 s, enrol: the bench campaign's effects, written by hand."""

    @workflow.run
    async def run(self, inp: SameEffectsInput) -> str:
        """Make the four effects in order."""
        scored = await workflow.execute_local_activity(
            ActivityName.SCORE_CUSTOMER,
            ScoreInput(
                workflow_id=workflow.info().workflow_id,
                step_id="score",
                campaign_id=inp.campaign_id,
                customer_keys=[inp.customer_key],
                models=["churn"],
            ),
            result_type=ScoreResult,
            start_to_close_timeout=SCORING.start_to_close,
            retry_policy=SCORING.retry,
        )
        churn = scored.customers[0].scores["churn"]
        properties = {"cohort_label": inp.cohort_id, "churn_score": f"{churn:.4f}"}
        await self._write(inp, "label", "set_properties", properties=properties)
        await workflow.sleep(timedelta(seconds=1))
        return await self._write(inp, "enrol", "enroll_sequence", sequence_id="bench")

    async def _write(self, inp: SameEffectsInput, step: str, action: str, **what: object) -> str:
        result: CrmWriteResult = await workflow.execute_activity(
            ActivityName.CRM_WRITE,
            CrmWriteInput(
                workflow_id=workflow.info().workflow_id,
                step_id=step,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                action=action,
                channel="email",
                purpose="marketing",
                **what,  # type: ignore[arg-type]
            ),
            result_type=CrmWriteResult,
            task_queue=inp.crm_task_queue,
            start_to_close_timeout=CRM.start_to_close,
            heartbeat_timeout=CRM.heartbeat,
            retry_policy=CRM.retry,
        )
        return str(result.outcome)
