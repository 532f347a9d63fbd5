"""Structured logs (structlog, stdlib routed through it) and OpenTelemetry tracing."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any, Literal

import structlog
from opentelemetry import context, metrics, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.typing import Processor

# Raw identifiers and contact data must never reach a log line; logs carry customer_key.
PII_KEYS = frozenset({"email", "source_id", "customer_id", "phone", "name"})
REDACTED = "[redacted]"


def redact_pii(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor replacing the value of every key in :data:`PII_KEYS`."""
    for key in event_dict:
        if key.lower() in PII_KEYS:
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(fmt: Literal["console", "json"], level: str) -> None:
    """Send structlog and stdlib logging to stderr, as JSON lines or for a human.

    Every line gets an ISO UTC timestamp, the level, the logger name, whatever the caller
    bound with ``structlog.contextvars.bind_contextvars`` (workflow_id, customer_key), and
    has PII-named keys redacted. Call once, at an entry point.
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if fmt == "json"
        else [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(),
                # Locals in a traceback may hold raw contact data the redaction never sees.
                exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False),
            )
        ]
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # Records from stdlib loggers (ours, uvicorn, the Temporal SDK) get the same fields;
            # ExtraAdder brings their ``extra=`` keys in, so they are redacted too.
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), redact_pii],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # One line per outgoing request (health probes, CRM calls) drowns what matters.
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            redact_pii,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


# The standard variables the OTLP exporter reads by itself when given no endpoint.
STANDARD_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

tracer = trace.get_tracer("cohortflow")


def configure_tracing(console: bool, service_name: str, otlp_endpoint: str | None = None) -> None:
    """Install the process's OpenTelemetry tracer provider: spans to stderr if ``console``,
    over OTLP/HTTP to ``otlp_endpoint`` (a collector's base URL) or, without it, to the
    standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` when that is set.

    With neither, no provider is installed: the API's no-op spans cost next to nothing, while
    recorded spans that no exporter reads would cost every activity and SQL statement.
    OpenTelemetry accepts one global provider per process: call it once, at an entry point.
    """
    exporters: list[SpanExporter] = []
    if console:
        exporters.append(ConsoleSpanExporter(out=sys.stderr))
    if otlp_endpoint or any(os.environ.get(name) for name in STANDARD_OTLP_ENDPOINTS):
        # Imported only when used: it brings requests and the protobuf messages along.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = f"{otlp_endpoint.rstrip('/')}/v1/traces" if otlp_endpoint else None
        exporters.append(OTLPSpanExporter(endpoint=endpoint))
    if not exporters:
        return
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def recording() -> bool:
    """Whether this process records spans (``configure_tracing`` installed a provider)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def trace_statements(engine: AsyncEngine) -> None:
    """A client span per SQL statement ``engine`` runs, in the caller's trace, when this
    process records spans (its statement text carries placeholders, never the values)."""
    if not recording():
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    # SQLAlchemyInstrumentor instruments once per process, and a process here may hold an
    # engine per database URL, so each engine gets the instrumentation's listeners directly.
    EngineTracer(  # type: ignore[no-untyped-call]
        trace.get_tracer(SQLAlchemyInstrumentor.__module__),
        engine.sync_engine,
        metrics.get_meter(SQLAlchemyInstrumentor.__module__).create_up_down_counter(
            "db.client.connections.usage", unit="connections"
        ),
    )


@contextlib.contextmanager
def batch_span(name: str, contexts: Sequence[context.Context]) -> Iterator[trace.Span]:
    """A span for work done once for several callers (a CRM batch, a group commit): a child
    of the first caller's span, linked to every other's, so each caller's trace leads to it.
    """
    others = [trace.get_current_span(c).get_span_context() for c in contexts[1:]]
    links = [trace.Link(other) for other in others if other.is_valid]
    parent = contexts[0] if contexts else None
    with tracer.start_as_current_span(name, context=parent, links=links) as span:
        span.set_attribute("cohortflow.batch.size", len(contexts))
        yield span
