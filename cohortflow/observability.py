"""Structured logs (structlog, stdlib routed through it) and OpenTelemetry tracing."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
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


def configure_tracing(console: bool, service_name: str) -> None:
    """Install the process's OpenTelemetry tracer provider; print spans to stderr if ``console``.

    OpenTelemetry accepts one global provider per process: call it once, at an entry point.
    """
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)
