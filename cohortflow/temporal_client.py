"""Connecting to Temporal and preparing a namespace for campaigns."""

from __future__ import annotations

import asyncio
import time

from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, DescribeTaskQueueRequest
from temporalio.client import Client, Interceptor
from temporalio.common import SearchAttributeIndexedValueType
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode

from cohortflow.metrics import HISTOGRAM_BUCKETS
from cohortflow.observability import recording
from cohortflow.payload_codec import data_converter, key_ring
from cohortflow.settings import Settings
from workflows.campaign.contract import SEARCH_ATTRIBUTES

# The names the `temporal` CLI and `docker-compose.yml` use for each indexed value type.
_TYPE_NAMES = {
    SearchAttributeIndexedValueType.TEXT: "Text",
    SearchAttributeIndexedValueType.KEYWORD: "Keyword",
    SearchAttributeIndexedValueType.INT: "Int",
    SearchAttributeIndexedValueType.DOUBLE: "Double",
    SearchAttributeIndexedValueType.BOOL: "Bool",
    SearchAttributeIndexedValueType.DATETIME: "Datetime",
    SearchAttributeIndexedValueType.KEYWORD_LIST: "KeywordList",
}


def search_attribute_types() -> dict[str, str]:
    """Every campaign search attribute's name and type name, from the typed keys alone."""
    return {key.name: _TYPE_NAMES[key.indexed_value_type] for key in SEARCH_ATTRIBUTES}


def _wanted() -> dict[str, IndexedValueType.ValueType]:
    # The SDK's enum has the protobuf enum's numbers.
    return {k.name: IndexedValueType.ValueType(k.indexed_value_type) for k in SEARCH_ATTRIBUTES}


class SearchAttributeConflict(RuntimeError):
    """A search attribute is registered on the server with another type than ours."""


async def connect(
    settings: Settings, *, tracing: bool = True, runtime: Runtime | None = None
) -> Client:
    """A client for the configured cluster and namespace, payloads encrypted under the
    configured key ring (workers built on it inherit that), with OpenTelemetry spans if
    asked and this process records them (Temporal's interceptor costs a worker several
    percent of its CPU even when its spans go nowhere), on ``runtime`` (default: the SDK's)."""
    interceptors: list[Interceptor] = [TracingInterceptor()] if tracing and recording() else []
    return await Client.connect(
        settings.resolved_temporal_address,
        namespace=settings.temporal_namespace,
        interceptors=interceptors,
        data_converter=data_converter(key_ring(settings)),
        runtime=runtime,
    )


def metrics_runtime(host: str, port: int) -> Runtime:
    """A Temporal runtime serving its metrics (the SDK's and what workflows and activities
    count through its meter) for Prometheus at ``http://host:port/metrics``."""
    prometheus = PrometheusConfig(
        bind_address=f"{host}:{port}",
        durations_as_seconds=True,
        histogram_bucket_overrides=HISTOGRAM_BUCKETS,
    )
    return Runtime(telemetry=TelemetryConfig(metrics=prometheus))


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register every campaign search attribute that ``namespace`` lacks; safe to repeat.

    Raises :class:`SearchAttributeConflict` when a name exists with a different type, which
    only an operator can resolve (attributes cannot be retyped in place).
    """
    try:
        missing = await _missing_search_attributes(client, namespace)
    except RPCError as exc:
        # The time-skipping test server cannot list search attributes, only add them.
        if exc.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        missing = _wanted()
    # One per call: the test server rejects a whole call when one of its attributes exists.
    for name, value_type in missing.items():
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    search_attributes={name: value_type}, namespace=namespace
                )
            )
        except RPCError as exc:
            # Registered since we looked, by another process (or earlier, on the test server).
            if exc.status != RPCStatusCode.ALREADY_EXISTS:
                raise


async def _missing_search_attributes(
    client: Client, namespace: str
) -> dict[str, IndexedValueType.ValueType]:
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    existing = {**listed.system_attributes, **listed.custom_attributes}
    missing: dict[str, IndexedValueType.ValueType] = {}
    for name, wanted in _wanted().items():
        if name not in existing:
            missing[name] = wanted
        elif existing[name] != wanted:
            raise SearchAttributeConflict(
                f"search attribute {name} is {IndexedValueType.Name(existing[name])} in "
                f"namespace {namespace}, cohortflow needs {IndexedValueType.Name(wanted)}"
            )
    return missing


async def wait_for_server(
    address: str,
    namespace: str,
    timeout: float,  # noqa: ASYNC109 - the deadline belongs in the error it raises
) -> Client:
    """Retry connecting until the server answers for ``namespace``, or raise TimeoutError."""
    last_error: Exception | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return await _ready_client(address, namespace)
                except (RuntimeError, RPCError) as exc:
                    last_error = exc
                await asyncio.sleep(0.2)
    except TimeoutError as exc:
        raise TimeoutError(
            f"Temporal at {address} did not serve namespace {namespace!r} within "
            f"{timeout:g}s (last error: {last_error})"
        ) from exc


async def _ready_client(address: str, namespace: str) -> Client:
    client = await Client.connect(address, namespace=namespace)
    await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=namespace))
    return client


async def wait_for_pollers(
    client: Client, task_queue: str, workers: int = 1, limit_seconds: float = 60.0
) -> None:
    """Until ``workers`` distinct worker processes poll ``task_queue`` for workflow tasks."""
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
        if len({poller.identity for poller in response.pollers}) >= workers:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{workers} worker(s) did not poll {task_queue!r} within {limit_seconds:g}s")
