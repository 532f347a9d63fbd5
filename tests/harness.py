"""Real parts for campaign tests: a sandbox CRM over HTTP, a trained model, a migrated
database, and workers with real activities on a fresh task queue per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload, SearchAttributes, WorkflowExecution
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.converter import decode_typed_search_attributes
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.campaign.batcher import CrmBatcher
from activities.campaign.crm import CrmActivities
from cohortflow.auth.identity import Identity, Role
from cohortflow.auth.tokens import TokenService
from cohortflow.campaigns.launcher import FIRST_ENTRY, Entry, Launcher, stored_definition
from cohortflow.crm.sandbox.app import SandboxConfig, create_app
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns, consent, customers
from cohortflow.storage.db import Database, migrate
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from scoring.train import TrainConfig, train_churn
from workers.campaign_worker import build_workers, campaign_activities, crm_batcher
from workflows.campaign.calls import CRM
from workflows.campaign.contract import (
    CAMPAIGN_WORKFLOW_V2,
    PATCHES,
    CampaignState,
    campaign_workflow_id,
)
from workflows.campaign.messages import CampaignResult, CampaignStatus, CustomerEvent
from workflows.campaign.state import CampaignInput
from workflows.campaign.workflow import CampaignWorkflow, CampaignWorkflowV2

# A lapsed one-time buyer: every model feature present, one of them missing (NaN -> None).
FEATURES: dict[str, float | None] = {name: 1.0 for name in FEATURE_NAMES}
FEATURES.update(recency_days=300.0, monetary_total=150.0, mean_interpurchase_days=None)


@dataclass
class Sandbox:
    """A sandbox CRM served over real HTTP on a free port."""

    url: str
    db_path: Path

    def inject(self, status: int, count: int = 1, retry_after: float = 1.0) -> None:
        """The next ``count`` CRM requests answer ``status``."""
        httpx.post(
            f"{self.url}/_sandbox/faults",
            json={"status": status, "count": count, "retry_after": retry_after},
        ).raise_for_status()

    def clear(self) -> None:
        """Drop any injected faults."""
        httpx.delete(f"{self.url}/_sandbox/faults").raise_for_status()

    def attempts(self, idempotency_key: str) -> int:
        """How many requests carried ``idempotency_key``."""
        response = httpx.get(
            f"{self.url}/_sandbox/requests", params={"idempotency_key": idempotency_key}
        )
        response.raise_for_status()
        return int(response.json()["count"])


def api_settings(
    harness: Harness, dev_settings: Settings, tmp_path: Path, key: str, **extra: Any
) -> Settings:
    """Settings for an API served over ``harness``'s database, deciding through the
    session's dev server on the harness's queues, with pseudonymisation key ``key``."""
    return Settings(
        data_dir=tmp_path / "api",
        database_url=harness.db.url,
        temporal_port=dev_settings.temporal_port,
        task_queue=harness.settings.task_queue,
        crm_task_queue=harness.settings.crm_task_queue,
        pseudonymisation_key=key,
        **extra,
    )


async def issue_token(db: Database, name: str, *roles: str, **scope: Any) -> str:
    """A new API token for ``name`` with ``roles`` (an hour long), as its secret."""
    lifetime = scope.pop("lifetime", timedelta(hours=1))
    issued = await TokenService(db).create(
        name, list(roles), lifetime=lifetime, by="tests", **scope
    )
    return issued.secret


def who(name: str, *roles: str) -> Identity:
    """An identity as the CLI's local one would be: ``roles`` (default: every role)."""
    granted = frozenset(Role(r) for r in roles) if roles else frozenset(Role)
    return Identity(name=name, roles=granted, token_id="local")


def bearer(token: str) -> dict[str, str]:
    """The header that presents ``token``."""
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def serve_app(app: FastAPI, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` over a real socket on ``port`` (default: a free one), in a thread, until
    the block ends."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{app.title} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serve_sandbox(db_path: Path, **config: Any) -> Iterator[Sandbox]:
    """Run the sandbox CRM in a thread until the block ends."""
    with serve_app(create_app(SandboxConfig(db_path=db_path, **config))) as url:
        yield Sandbox(url=url, db_path=db_path)


HUBSPOT_TOKEN = "pat-test"


@contextlib.contextmanager
def hubspot_sandbox(db_path: Path, **config: Any) -> Iterator[str]:
    """The sandbox in HubSpot mode on a free port; generous rate limits unless ``config`` sets
    them."""
    config = {"rate_limit": 10_000, **config}
    app = create_app(SandboxConfig(db_path=db_path, mode="hubspot", token=HUBSPOT_TOKEN, **config))
    with serve_app(app) as url:
        yield url


def hubspot_settings(settings: Settings, url: str, **overrides: Any) -> Settings:
    """``settings`` with the CRM set to the HubSpot-mode sandbox at ``url``."""
    crm = {
        "crm_kind": "hubspot",
        "crm_url": url,
        "crm_token": SecretStr(HUBSPOT_TOKEN),
        "crm_user_id": "7",
        "crm_sender_email": "rep@example.com",
    }
    return settings.model_copy(update={**crm, **overrides})


def sandbox_view(url: str, route: str) -> Any:
    """What the sandbox at ``url`` reports at ``/_sandbox/{route}`` (stats, effects, ...)."""
    response = httpx.get(f"{url}/_sandbox/{route}", timeout=30)
    response.raise_for_status()
    return response.json()


def train_small_registry(root: Path) -> ModelRegistry:
    """A registry holding a quickly trained churn champion."""
    registry = ModelRegistry(root)
    trained = train_churn(load_transactions(), TrainConfig(n_estimators=30, bootstrap_resamples=0))
    registry.register(trained, promoted_by="tests")
    return registry


def spec_document(**overrides: Any) -> dict[str, Any]:
    """A small campaign: score, branch to approval on high churn, label, wait, enrol."""
    document: dict[str, Any] = {
        "campaign_id": f"t{uuid.uuid4().hex[:10]}",
        "name": "Test campaign",
        "owner": "crm-team",
        "entry_cohort": "test_cohort",
        "safe_default_segment": "nurture_default",
        "sensitive": True,
        "approval": {"timeout": "P3D", "on_timeout": "reject"},
        "steps": [
            {"id": "score", "type": "score", "models": ["churn"]},
            {
                "id": "route",
                "type": "branch",
                "rules": [
                    {"all": [{"score": "churn", "op": ">=", "value": 0.0}], "next": "approve"}
                ],
                "default": "label",
            },
            {"id": "approve", "type": "approval", "reason": "test approval"},
            {
                "id": "label",
                "type": "crm",
                "action": "set_properties",
                "properties": {"cohort_label": "{cohort}", "churn_score": "{score.churn}"},
            },
            {"id": "pause", "type": "wait", "duration": "PT1H"},
            {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "winback"},
        ],
    }
    document.update(overrides)
    return document


def without_approval(document: dict[str, Any]) -> dict[str, Any]:
    """The same campaign with the branch sending everyone straight to ``label``."""
    steps = [s for s in document["steps"] if s["id"] not in ("route", "approve")]
    return {**document, "sensitive": False, "steps": steps}


@dataclass(frozen=True)
class Described:
    """What a test reads from a workflow's description."""

    run_id: str
    status: WorkflowExecutionStatus
    typed_search_attributes: TypedSearchAttributes


class Harness:
    """A database, the sandbox CRM and workers on unique task queues, for one test."""

    def __init__(
        self,
        client: Client,
        db: Database,
        registry_root: Path,
        sandbox: Sandbox,
        env: WorkflowEnvironment | None = None,
    ) -> None:
        self.client = client
        self.env = env
        self.db = db
        self.registry_root = registry_root
        self.sandbox = sandbox
        suffix = uuid.uuid4().hex[:8]
        self.settings = Settings(
            task_queue=f"campaigns-{suffix}",
            crm_task_queue=f"crm-{suffix}",
            crm_url=sandbox.url,
            # Tests that are not about the ceiling or batching should not wait for either.
            crm_rate_limit=10_000,
            crm_batch_linger_ms=10,
        )

    @contextlib.asynccontextmanager
    async def workers(self, crm_type: type[CrmActivities] = CrmActivities) -> AsyncIterator[None]:
        """Run real activities against the real database, scorer and sandbox CRM, through
        the same CRM path (connector, shared ceiling, batcher) as a worker process."""
        batcher = crm_batcher(self.settings, self.db)
        scorer = Scorer(ModelRegistry(self.registry_root))
        activities = campaign_activities(self.settings, self.db, scorer, batcher, crm_type)
        built = build_workers(
            self.client,
            activities,
            task_queue=self.settings.task_queue,
            crm_task_queue=self.settings.crm_task_queue,
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                for worker in built:
                    await stack.enter_async_context(worker)
                yield
        finally:
            await batcher.aclose()

    async def apply(self, document: dict[str, Any]) -> tuple[CampaignSpec, int]:
        """Store the spec; returns it with its version."""
        spec = CampaignSpec.model_validate(document)
        async with self.db.transaction() as session:
            version, _ = await campaigns.save_spec_version(
                session, spec.campaign_id, spec.model_dump(mode="json"), created_by="tests"
            )
        return spec, version

    async def customer(self, granted: bool = True, key: str = "", **features: float | None) -> str:
        """A stored customer (``key``, or a new one) with features and (by default) e-mail
        marketing consent."""
        key = key or f"c_{uuid.uuid4().hex[:24]}"
        async with self.db.transaction() as session:
            await customers.upsert_customers(
                session,
                [customers.CustomerRecord(key, f"src-{key}", f"{key}@example.com")],
            )
            await customers.upsert_features(
                session, [(key, {**FEATURES, **features}, datetime.now(UTC))]
            )
            await consent.set_consent(session, key, "email", "marketing", granted, "tests")
        return key

    async def launch(
        self, spec: CampaignSpec, version: int, key: str
    ) -> WorkflowHandle[Any, CampaignResult]:
        """Launch through the real launcher; returns the workflow handle."""
        await Launcher(self.client, self.db, self.settings).launch(
            spec, version, Entry(key, spec.entry_cohort)
        )
        workflow_id = campaign_workflow_id(spec.campaign_id, key, FIRST_ENTRY)
        return self.client.get_workflow_handle_for(CampaignWorkflow.run, workflow_id)

    async def start(
        self, spec: CampaignSpec, version: int, key: str, **fields: Any
    ) -> WorkflowHandle[CampaignWorkflowV2, CampaignResult]:
        """Start a campaign directly, with input fields a launch never sets (a history bound,
        a carried state)."""
        async with self.db.transaction() as session:
            pinned = await stored_definition(session, spec.campaign_id, version)
        inp = CampaignInput(
            spec.campaign_id,
            version,
            key,
            FIRST_ENTRY,
            spec.entry_cohort,
            crm_task_queue=self.settings.crm_task_queue,
            spec=pinned,
            **fields,
        )
        return await self.client.start_workflow(
            CampaignWorkflowV2.run,
            inp,
            id=campaign_workflow_id(spec.campaign_id, key, FIRST_ENTRY),
            task_queue=self.settings.task_queue,
        )

    async def describe(self, handle: WorkflowHandle[Any, Any]) -> Described:
        """Run id, status and typed search attributes of the handle's latest run.

        Read from the service, leaving out attributes a workflow unset: the time-skipping
        test server keeps those as null payloads, which the SDK's ``describe()`` cannot
        decode (the dev server and real clusters drop them).
        """
        raw = await self.client.workflow_service.describe_workflow_execution(
            DescribeWorkflowExecutionRequest(
                namespace=self.client.namespace, execution=WorkflowExecution(workflow_id=handle.id)
            )
        )
        info = raw.workflow_execution_info
        fields = {
            name: payload
            for name, payload in info.search_attributes.indexed_fields.items()
            if payload.metadata.get("encoding") != b"binary/null"
        }
        return Described(
            info.execution.run_id,
            WorkflowExecutionStatus(info.status),
            decode_typed_search_attributes(SearchAttributes(indexed_fields=fields)),
        )

    async def closed(self, handle: WorkflowHandle[Any, Any], limit: float = 20.0) -> Described:
        """Wait until the handle's latest run is no longer running, by asking the service.

        Unlike a ``status`` query this leaves time skipping locked and does not depend on
        the history the test server keeps: after a signal that races the final workflow task,
        that server can close a run with a history a query cannot replay to its end.
        """
        deadline = time.monotonic() + limit
        while (described := await self.describe(handle)).status == WorkflowExecutionStatus.RUNNING:
            if time.monotonic() > deadline:
                raise AssertionError(f"{handle.id} still running after {limit} s")
            await asyncio.sleep(0.1)
        return described

    async def result(self, handle: WorkflowHandle[Any, CampaignResult]) -> CampaignResult:
        """Wait for the campaign's end, letting a time-skipping server jump over its timers."""
        if self.env is None:
            return await handle.result()
        # Only the time-skipping environment has it; the dev server's env is None here.
        async with self.env.time_skipping_unlocked():  # type: ignore[attr-defined]
            return await handle.result()


def crm_env(attempt: int = 1) -> ActivityEnvironment:
    """An activity context with the options the workflow schedules ``crm_write`` with."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        activity_type="crm_write",
        attempt=attempt,
        start_to_close_timeout=CRM.start_to_close,
        heartbeat_timeout=CRM.heartbeat,
        schedule_to_close_timeout=None,
        retry_policy=CRM.retry,
    )
    return env


def crm_path(db: Database, crm_url: str, **settings: Any) -> CrmBatcher:
    """The CRM path a worker process builds (connector, shared ceiling, batcher); tests that
    are not about the ceiling or batching do not wait for either."""
    defaults: dict[str, Any] = {"crm_rate_limit": 10_000, "crm_batch_linger_ms": 10}
    return crm_batcher(Settings(crm_url=crm_url, **{**defaults, **settings}), db)


async def consenting_customer(db: Database, key: str = "") -> str:
    """A customer (``key``, or a new one) who consented to e-mail marketing."""
    key = key or f"c_{uuid.uuid4().hex[:24]}"
    async with db.transaction() as session:
        await consent.set_consent(session, key, "email", "marketing", True, "tests")
    return key


HISTORIES = Path(__file__).parent / "histories"


async def save_history_if_asked(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With ``COHORTFLOW_SAVE_HISTORIES=1``, keep this run's history for the replay tests as
    ``campaign_{generation}_{name}.json``, the generation being the newest patch's: how
    ``tests/histories/`` gets a history of each new workflow behaviour. A saved history is a
    released version's record and is never overwritten."""
    if os.environ.get("COHORTFLOW_SAVE_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    # The lean type has generations of its own, none patched yet.
    lean = started.workflow_type.name == CAMPAIGN_WORKFLOW_V2
    path = HISTORIES / (
        f"campaign_lean_v1_{name}.json" if lean else f"campaign_{PATCHES[-1].since}_{name}.json"
    )
    if not path.exists():
        path.write_text(history.to_json())


async def save_launch_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With ``COHORTFLOW_SAVE_HISTORIES=1``, keep the history of the run ``handle`` names as
    ``launch_v1_{name}.json`` (never overwritten), for the replay tests of the bulk
    launcher. Histories from the dev server are sealed with the tests' key ring."""
    path = HISTORIES / f"launch_v1_{name}.json"
    if os.environ.get("COHORTFLOW_SAVE_HISTORIES") == "1" and not path.exists():
        path.write_text((await handle.fetch_history()).to_json())


async def save_cohort_evaluation_history(client: Client, cohort_id: str, name: str) -> None:
    """With ``COHORTFLOW_SAVE_HISTORIES=1``, keep the history of the cohort's first scheduled
    evaluation as ``cohort_evaluation_v1_{name}.json`` (never overwritten), for the replay
    tests of ``CohortEvaluationWorkflow``."""
    path = HISTORIES / f"cohort_evaluation_v1_{name}.json"
    if os.environ.get("COHORTFLOW_SAVE_HISTORIES") != "1" or path.exists():
        return
    query = f'WorkflowType = "CohortEvaluationWorkflow" AND CohortId = "{cohort_id}"'
    async for execution in client.list_workflows(query):
        history = await client.get_workflow_handle(execution.id).fetch_history()
        path.write_text(history.to_json())
        return


async def decoded(client: Client, payload: Payload) -> Any:
    """A payload read from a raw history, opened with ``client``'s codec and converted."""
    (value,) = await client.data_converter.decode([payload])
    return value


async def current_details(handle: WorkflowHandle[Any, Any]) -> str:
    """What the Temporal UI shows as the workflow's current details."""
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return str(metadata.current_details)


async def status_of(handle: WorkflowHandle[Any, CampaignResult]) -> CampaignStatus:
    """The campaign's ``status`` query, on its latest run."""
    return await handle.query(CampaignWorkflow.status)


async def push_until_continued(handle: WorkflowHandle[Any, CampaignResult], runs: int) -> None:
    """Send unrelated customer events, each growing the history, until run ``runs`` starts
    (the campaign started with a small ``history_limit``)."""
    for _ in range(40):
        status = await status_of(handle)
        if status.runs >= runs:
            return
        await handle.signal(
            CampaignWorkflow.customer_event, CustomerEvent("page_view", "2026-01-01T00:00:00Z")
        )
        await asyncio.sleep(0.05)
    raise AssertionError(f"the campaign never reached run {runs}")


async def wait_for_state(
    handle: WorkflowHandle[Any, Any], state: CampaignState, limit: float = 20.0
) -> CampaignStatus:
    """Query ``status`` until the campaign reaches ``state``."""
    deadline = time.monotonic() + limit
    last: CampaignStatus | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = await handle.query(CampaignWorkflow.status)
            if last.state == state:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"campaign never reached {state}; last status {last}")


async def migrated(url: str) -> Database:
    """A migrated database at ``url``."""
    await migrate(url)
    return Database(url)
