"""What operators do with cohorts, shared by the CLI and the API: apply a definition,
evaluate it, signal exits, and start the bulk launch of its entries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from cohortflow import metrics
from cohortflow.audit.actions import record_action
from cohortflow.campaigns import visibility
from cohortflow.cohorts import schedules
from cohortflow.cohorts.evaluator import Evaluation, ScoreFn, evaluate, model_scores
from cohortflow.cohorts.rules import CohortDefinition, CohortError, ScoreRule, leaves, parse_cohort
from cohortflow.errors import Invalid, NotFound
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec, parse_spec
from cohortflow.storage import campaigns, cohorts
from cohortflow.storage.db import Database
from workflows.campaign.contract import SA, AuditKind
from workflows.campaign.messages import CohortExited
from workflows.campaign.workflow import CampaignWorkflow
from workflows.launch import LaunchCampaignsWorkflow, LaunchInput, launch_workflow_id

log = structlog.get_logger(__name__)


@dataclass
class LaunchStarted:
    """A bulk launch for one campaign: its workflow id and how many entries it covers."""

    campaign_id: str
    workflow_id: str
    total: int
    started: bool  # False when this exact launch ran before (nothing new to launch)


@dataclass
class EvaluationReport:
    """An evaluation and what followed from it."""

    evaluation: Evaluation
    launches: list[LaunchStarted] = field(default_factory=list)
    exits_signalled: int = 0
    temporal: str = "skipped"  # ok | unreachable | skipped


def to_invalid(exc: CohortError) -> Invalid:
    """A cohort validation error as an operator error naming the first bad field."""
    first = exc.problems[0]
    return Invalid("; ".join(exc.problems), field=first.split(": ", 1)[0])


class CohortService:
    """Cohort operations over a database and (when reachable) Temporal."""

    def __init__(self, db: Database, settings: Settings, client: Client | None) -> None:
        self.db = db
        self._settings = settings
        self._client = client
        self._score: ScoreFn | None = None

    async def apply(self, document: Any, by: str) -> tuple[CohortDefinition, int, bool]:
        """Validate and store a definition (a change audited as applied by ``by``), then make
        or update its evaluation schedule (when Temporal is away, the next worker start does);
        returns the definition, its version and whether it changed."""
        try:
            definition = parse_cohort(document)
        except CohortError as exc:
            raise to_invalid(exc) from exc
        async with self.db.transaction() as session:
            version, changed = await cohorts.save_cohort(
                session, definition.cohort_id, definition.model_dump(mode="json", by_alias=True)
            )
            if changed:
                subject = f"cohort:{definition.cohort_id}"
                await record_action(session, AuditKind.COHORT_APPLIED, subject, by, version=version)
        if self._client is not None:
            try:
                await schedules.ensure(self._client, self._settings, definition)
            except RPCError as exc:
                log.warning(
                    "cohort schedule not made", cohort_id=definition.cohort_id, error=str(exc)
                )
        return definition, version, changed

    async def ensure_schedules(self) -> int:
        """Make or update every stored cohort's schedule (a worker does at start); how many."""
        if self._client is None:
            return 0
        async with self.db.transaction() as session:
            stored = await cohorts.list_cohorts(session)
        for cohort, _ in stored:
            await schedules.ensure(self._client, self._settings, parse_cohort(cohort.definition))
        return len(stored)

    async def definition(self, cohort_id: str) -> CohortDefinition:
        """The stored definition; NotFound if there is none."""
        async with self.db.transaction() as session:
            cohort = await cohorts.get_cohort(session, cohort_id)
        if cohort is None:
            raise NotFound(f"no cohort {cohort_id!r}", field="cohort_id")
        return parse_cohort(cohort.definition)

    def _scores(self, definition: CohortDefinition) -> ScoreFn | None:
        if not any(isinstance(c, ScoreRule) for c in leaves(definition.rule)):
            return None
        if self._score is None:
            from scoring.registry import ModelRegistry
            from scoring.scorer import Scorer

            self._score = model_scores(Scorer(ModelRegistry(self._settings.resolved_models_dir)))
        return self._score

    async def evaluate(
        self,
        cohort_id: str,
        *,
        launch: bool = True,
        now: datetime | None = None,
        keys: Sequence[str] | None = None,
    ) -> EvaluationReport:
        """Evaluate (only ``keys`` when given), store the difference, signal exits and start
        launches of entries.

        A full evaluation's launches cover every entry so far, catching up one whose launch
        never started; an incremental one's cover only the entries it stored.
        """
        definition = await self.definition(cohort_id)
        report = EvaluationReport(
            await metrics.timed(
                "cohortflow_cohort_evaluation_seconds",
                "How long evaluating a cohort's rule took, full or for touched customers",
                evaluate(
                    self.db,
                    definition,
                    now,
                    self._scores(definition),
                    keys,
                    snapshots=self._settings.resolved_feature_snapshot_dir,
                ),
                mode="full" if keys is None else "incremental",
            )
        )
        diff = report.evaluation.diff
        after = 0 if keys is None else (diff.first_seq or 1) - 1
        if self._client is None:
            report.temporal = "unreachable"
            return report
        try:
            report.exits_signalled = await self._signal_exits(
                cohort_id, report.evaluation.diff.exited
            )
            if launch and (keys is None or diff.entered):
                report.launches = await self.start_launches(cohort_id, after_seq=after)
            report.temporal = "ok"
        except RPCError as exc:
            log.warning("temporal failed after evaluation", error=str(exc))
            report.temporal = "unreachable"
        return report

    async def _signal_exits(self, cohort_id: str, keys: Sequence[str]) -> int:
        client = self._client
        if client is None or not keys:
            return 0
        signal = CohortExited(cohort_id=cohort_id, reason=f"left cohort {cohort_id}")
        sent = 0
        for chunk in visibility.chunks(keys):
            query = visibility.running(
                visibility.one_of(SA.CUSTOMER_KEY, chunk),
                visibility.equals(SA.COHORT_ID, cohort_id),
            )
            sent += await visibility.signal_running(
                client, query, CampaignWorkflow.cohort_exited, signal
            )
        return sent

    async def campaigns_for(self, cohort_id: str) -> list[tuple[CampaignSpec, int]]:
        """Active campaigns whose latest spec enters from this cohort, with that version."""
        found: list[tuple[CampaignSpec, int]] = []
        async with self.db.transaction() as session:
            for campaign in await campaigns.list_campaigns(session):
                if campaign.status != "active":
                    continue
                document = await campaigns.get_spec(
                    session, campaign.campaign_id, campaign.latest_version
                )
                if document is None:
                    continue
                spec = parse_spec(document)
                if spec.entry_cohort == cohort_id:
                    found.append((spec, campaign.latest_version))
        return found

    async def start_launches(self, cohort_id: str, *, after_seq: int = 0) -> list[LaunchStarted]:
        """Start (idempotently) one bulk launch per campaign over the entries after
        ``after_seq`` (every entry so far by default).

        Entries a previous launch handled are skipped by their stored decisions, so the
        launch is started even when this evaluation added nothing: an earlier one that
        crashed before starting its launch is caught up.
        """
        client = self._client
        if client is None:
            return []
        async with self.db.transaction() as session:
            up_to = await cohorts.last_transition_seq(session, cohort_id, cohorts.ENTERED)
            if up_to is None:
                return []
            total = await cohorts.count_transitions(
                session, cohort_id, cohorts.ENTERED, after_seq=after_seq, up_to_seq=up_to
            )
        started: list[LaunchStarted] = []
        for spec, version in await self.campaigns_for(cohort_id):
            workflow_id = launch_workflow_id(spec.campaign_id, cohort_id, up_to)
            try:
                await client.start_workflow(
                    LaunchCampaignsWorkflow.run,
                    LaunchInput(
                        spec.campaign_id, version, cohort_id, up_to, total, after_seq=after_seq
                    ),
                    id=workflow_id,
                    task_queue=self._settings.task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    static_summary=f"launch {spec.campaign_id} for {total} entries of {cohort_id}",
                )
                started.append(LaunchStarted(spec.campaign_id, workflow_id, total, True))
            except WorkflowAlreadyStartedError:
                started.append(LaunchStarted(spec.campaign_id, workflow_id, total, False))
        return started
