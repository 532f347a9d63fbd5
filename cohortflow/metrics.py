"""Figures a worker process counts outside workflow code (CRM requests and the ceiling,
scoring latency, cohort evaluations), through the Temporal SDK's meter: they are served
beside the SDK's own metrics wherever the worker's runtime exports them
(``COHORTFLOW_WORKER_METRICS_PORT``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.runtime import Runtime

T = TypeVar("T")

# Buckets for our histograms, in seconds (the SDK's defaults suit its own latencies).
HISTOGRAM_BUCKETS: dict[str, list[float]] = {
    "cohortflow_scoring_seconds": [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5],
    "cohortflow_crm_ceiling_wait_seconds": [0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30],
    "cohortflow_cohort_evaluation_seconds": [0.01, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 300],
}


def meter() -> MetricMeter:
    """The running activity's meter (its worker's runtime, labelled with the activity), or
    else the process's default runtime's, which a worker process sets to its own."""
    if activity.in_activity():
        return activity.metric_meter()
    return Runtime.default().metric_meter


def count(name: str, description: str, labels: Mapping[str, str], value: int = 1) -> None:
    """Add ``value`` to the counter ``name`` under ``labels``."""
    meter().create_counter(name, description).add(value, labels)


def observe_seconds(name: str, description: str, seconds: float, **labels: str) -> None:
    """Record a duration in the histogram ``name``, in seconds."""
    meter().create_histogram_float(name, description, "s").record(seconds, labels)


def set_gauge(name: str, description: str, value: float, **labels: str) -> None:
    """Set the gauge ``name`` under ``labels``."""
    meter().create_gauge_float(name, description).set(value, labels)


async def timed(name: str, description: str, work: Awaitable[T], **labels: str) -> T:
    """``work``'s result, its duration recorded in the histogram ``name`` (failures too)."""
    began = time.perf_counter()
    try:
        return await work
    finally:
        observe_seconds(name, description, time.perf_counter() - began, **labels)
