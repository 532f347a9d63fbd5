"""The long-running parts, one per process: worker, HTTP API, stream consumer, sandbox CRM."""

from __future__ import annotations

import asyncio
import signal

import structlog
import uvicorn
from temporalio.runtime import Runtime

from cohortflow.settings import Settings
from cohortflow.temporal_client import (
    connect,
    ensure_search_attributes,
    metrics_runtime,
    wait_for_server,
)

log = structlog.get_logger(__name__)

# A worker started next to a server that is still coming up waits this long for it.
SERVER_WAIT_SECONDS = 120.0


def compile_workflow_sources() -> bool:
    """Write bytecode for the workflow modules where it is missing or stale; False where
    it could not be written (a read-only install: then it was compiled at install time).

    The workflow sandbox imports these modules afresh for every workflow it creates; without
    bytecode (``PYTHONDONTWRITEBYTECODE``, an editable install) each import compiles the
    source again, which profiles showed costing a third of a busy worker.
    """
    import compileall

    import workflows

    written = True
    for folder in workflows.__path__:
        try:
            written = bool(compileall.compile_dir(folder, quiet=2)) and written
        except OSError:
            written = False
    return written


async def run_worker(settings: Settings) -> None:
    """Run the campaign and CRM workers until SIGINT or SIGTERM.

    Refuses unsafe production settings first (``Settings.check_production``): the worker is
    what writes to the CRM.
    """
    settings.check_production()
    from workers.campaign_worker import serve

    compile_workflow_sources()

    port = settings.worker_metrics_port
    runtime = None if port is None else metrics_runtime(settings.api_host, port)
    if runtime is not None:
        # What the process counts outside activities (the cohort refresher) goes here too.
        Runtime.set_default(runtime)
    await wait_for_server(
        settings.resolved_temporal_address, settings.temporal_namespace, SERVER_WAIT_SECONDS
    )
    client = await connect(settings, runtime=runtime)
    await ensure_search_attributes(client, settings.temporal_namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, client, stop)
    log.info("worker stopped")


LAG_REPORT_SECONDS = 5.0


async def run_consumer(settings: Settings, *, batch: int) -> None:
    """Read events from NATS JetStream into the store until SIGINT or SIGTERM; a batch in
    hand is finished (stored and acknowledged) before stopping. Reports lag every 5 s, in
    the log and (with ``consume_metrics_port``) as Prometheus gauges."""
    settings.check_production()
    from cohortflow.events.ingest import Ingestor
    from cohortflow.events.nats_source import JetStreamSource
    from cohortflow.events.relay import SignalRelay
    from cohortflow.events.signals import TemporalSignaller
    from cohortflow.events.stream import StreamConsumer
    from cohortflow.events.stream_metrics import ConsumerMetrics
    from cohortflow.pseudonymisation import Pseudonymiser
    from cohortflow.storage.db import Database

    db = Database(settings.resolved_database_url)
    relay = SignalRelay(db, TemporalSignaller(lambda: connect(settings, tracing=False)))
    ingestor = Ingestor(db, Pseudonymiser.from_settings(settings, create=False), relay)
    source = await JetStreamSource.connect(settings)
    consumer = StreamConsumer(source, ingestor, batch=batch)
    metrics = ConsumerMetrics(settings.events_consumer)
    if settings.consume_metrics_port is not None:
        metrics.serve(settings.api_host, settings.consume_metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("consuming", subject=settings.events_subject, consumer=settings.events_consumer)
    reported = loop.time()
    try:
        while not stop.is_set():
            try:
                await consumer.run_once(wait=1.0)
            except Exception as exc:  # the batch was nak'ed; the database may be back soon
                log.warning("batch not stored; offered again", error=type(exc).__name__)
                await asyncio.sleep(1.0)
            if loop.time() - reported >= LAG_REPORT_SECONDS:
                reported = loop.time()
                lag = await source.lag()
                metrics.update(lag, consumer.stats)
                log.info("consumer lag", **vars(lag), since_start=vars(consumer.stats))
    finally:
        await source.close()
        await db.dispose()
    log.info("consumer stopped", **vars(consumer.stats))


def run_api(settings: Settings) -> None:
    """Serve the HTTP API until SIGINT or SIGTERM.

    Refuses unsafe production settings first: the API pseudonymises customer ids, and would
    otherwise generate a key of its own.
    """
    settings.check_production()
    from cohortflow.api.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
    )


def run_crm_sandbox(settings: Settings) -> None:
    """Serve the sandbox CRM until SIGINT or SIGTERM."""
    from cohortflow.crm.sandbox.app import SandboxConfig, serve

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    serve(
        SandboxConfig(
            db_path=settings.resolved_crm_sandbox_db,
            rate_limit=settings.crm_sandbox_rate_limit,
            window_seconds=settings.crm_sandbox_rate_window_seconds,
            error_rate=settings.crm_sandbox_error_rate,
            latency_ms=settings.crm_sandbox_latency_ms,
            mode=settings.crm_sandbox_mode,
            # hubspot mode asks for the token the connector sends; own mode stays open.
            token=(
                settings.crm_token.get_secret_value()
                if settings.crm_sandbox_mode == "hubspot" and settings.crm_token
                else None
            ),
            daily_limit=settings.crm_sandbox_daily_limit,
            daily_reset_timezone=settings.crm_daily_reset_timezone,
        ),
        settings.crm_sandbox_host,
        settings.crm_sandbox_port,
    )
