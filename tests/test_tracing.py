"""Traces: one campaign on the dev server is one connected trace from its launch through every
activity, the CRM's HTTP requests and the database statements, with no contact data in it;
and spans leave the process over OTLP/HTTP when an endpoint is configured."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cohortflow.settings import Settings
from cohortflow.temporal_client import connect
from tests.harness import Harness, Sandbox, migrated, spec_document, without_approval
from workflows.campaign.contract import CAMPAIGN_WORKFLOW_V2, ActivityName, CampaignState

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Every span this process ends from now on, in memory.

    OpenTelemetry takes one global provider per process and never gives it back, so a
    provider installed earlier in the session is reused rather than replaced.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later spans are dropped, not kept for ever


def lineage(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """``span`` and its ancestors up to the first one not among ``by_id`` (the root when
    the trace is whole)."""
    chain = [span]
    while chain[-1].parent is not None and chain[-1].parent.span_id in by_id:
        chain.append(by_id[chain[-1].parent.span_id])
    return chain


def names(spans: Sequence[ReadableSpan]) -> list[str]:
    return [s.name for s in spans]


@pytest.mark.devserver
async def test_one_campaign_is_one_connected_trace(
    dev_settings: Settings,
    registry_root: Path,
    sandbox: Sandbox,
    tmp_path: Path,
    exported: InMemorySpanExporter,
) -> None:
    client = await connect(dev_settings)  # with Temporal's tracing interceptor
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    harness = Harness(client, db, registry_root, sandbox)
    document = without_approval(spec_document())
    document["steps"] = [
        {**s, "duration": "PT1S"} if s["type"] == "wait" else s for s in document["steps"]
    ]
    spec, version = await harness.apply(document)
    key = await harness.customer()
    try:
        async with harness.workers():
            exported.clear()
            handle = await harness.launch(spec, version, key)
            assert (await harness.result(handle)).state == CampaignState.COMPLETED
            history = await handle.fetch_history()
    finally:
        await db.dispose()
    spans = exported.get_finished_spans()
    (launch,) = [s for s in spans if s.name == "launch campaign"]
    assert launch.parent is None
    trace_id = launch.context.trace_id
    ours = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in ours}

    # Connected: every span of the trace leads back to the launch through exported parents.
    for span in ours:
        assert lineage(span, by_id)[-1] is launch, names(lineage(span, by_id))
    # Every span Temporal's interceptor made for this workflow is in that trace.
    workflow_spans = [
        s for s in spans if (s.attributes or {}).get("temporalWorkflowID") == handle.id
    ]
    assert {s.context.trace_id for s in workflow_spans} == {trace_id}
    assert f"StartWorkflow:{CAMPAIGN_WORKFLOW_V2}" in names(ours)
    assert f"RunWorkflow:{CAMPAIGN_WORKFLOW_V2}" in names(ours)
    # Through every activity the history scheduled, and scoring's local activity.
    scheduled = {
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    assert ActivityName.CRM_WRITE in scheduled
    ran = {s.name.removeprefix("RunActivity:") for s in ours if s.name.startswith("RunActivity:")}
    assert scheduled | {ActivityName.SCORE_CUSTOMER} <= ran

    # The CRM's HTTP requests, each inside the crm_write activity that caused it.
    crm = [s for s in ours if s.name.startswith("CRM ") and s.kind == trace.SpanKind.CLIENT]
    assert crm, names(ours)
    for span in crm:
        assert (span.attributes or {})["http.response.status_code"] < 400
        assert f"RunActivity:{ActivityName.CRM_WRITE}" in names(lineage(span, by_id))
    # Database statements: the launch's own write and the activities' writes.
    statements = [s for s in ours if "db.system" in (s.attributes or {})]
    assert any(s.parent is not None and s.parent.span_id == launch.context.span_id
               for s in statements)  # fmt: skip
    in_activities = {
        activity
        for s in statements
        if str((s.attributes or {})["db.statement"]).startswith("INSERT")
        for activity in names(lineage(s, by_id))
        if activity.startswith("RunActivity:")
    }
    assert f"RunActivity:{ActivityName.SCORE_CUSTOMER}" in in_activities  # its audit row
    assert f"RunActivity:{ActivityName.CRM_WRITE}" in in_activities  # the gate and record

    # No contact data: the customer's e-mail and source id never reach a span.
    values = " ".join(str(v) for s in spans for v in [s.name, *(s.attributes or {}).values()])
    assert f"{key}@example.com" not in values
    assert f"src-{key}" not in values


class _Collector(BaseHTTPRequestHandler):
    """Records each POST's path and body, answering as an OTLP/HTTP collector does."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


# A process set up as every cohortflow command is, doing traced work: a span and, inside it,
# a statement on a database.
TRACED_PROCESS = """
import asyncio, sys
from opentelemetry import trace
from sqlalchemy import text
from cohortflow.cli.common import settings_for, setup_observability
from cohortflow.storage.db import Database

setup_observability(settings_for(), "cohortflow-otlp-test")

async def main() -> None:
    db = Database("sqlite+aiosqlite:///" + sys.argv[1])
    with trace.get_tracer("test").start_as_current_span("evaluate-cohort"):
        async with db.transaction() as session:
            await session.execute(text("SELECT 1"))
    await db.dispose()

asyncio.run(main())
"""


def run_traced(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "COHORTFLOW_"))}
    return subprocess.run(
        [sys.executable, "-c", TRACED_PROCESS, str(tmp_path / "otlp.db")],
        env={**clean, "PYTHONPATH": str(REPO), "COHORTFLOW_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "variable", ["COHORTFLOW_OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
)
def test_spans_reach_an_otlp_collector_when_an_endpoint_is_set(
    variable: str, collector: tuple[str, list[tuple[str, str, bytes]]], tmp_path: Path
) -> None:
    url, received = collector
    done = run_traced(tmp_path, **{variable: url})
    assert done.returncode == 0, done.stderr
    assert received, done.stderr
    assert {(path, kind) for path, kind, _ in received} == {
        ("/v1/traces", "application/x-protobuf")
    }
    spans: dict[str, Any] = {}
    for _, _, body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "cohortflow-otlp-test"
            for scope in resource_spans.scope_spans:
                spans.update({s.name: s for s in scope.spans})
    parent = spans["evaluate-cohort"]
    statement = next(s for name, s in spans.items() if name != "evaluate-cohort")
    assert statement.trace_id == parent.trace_id
    assert statement.parent_span_id == parent.span_id
    assert {a.key for a in statement.attributes} >= {"db.system", "db.statement"}
