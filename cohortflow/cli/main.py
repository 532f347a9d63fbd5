"""The ``cohortflow`` command line: run the parts, launch the demo, operate campaigns.

Every operator error is one line on stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from cohortflow.cli.audit import audit_app
from cohortflow.cli.campaigns import campaign_app
from cohortflow.cli.cohorts import cohort_app
from cohortflow.cli.common import (
    DataDir,
    LogFormat,
    err,
    out,
    run,
    settings_for,
    setup_observability,
)
from cohortflow.cli.consume import consume
from cohortflow.cli.customers import customer_app
from cohortflow.cli.events import events_app
from cohortflow.cli.models import models_app
from cohortflow.cli.operators import approvals_app, consent_app, decisions_app
from cohortflow.cli.synth import synth_app
from cohortflow.cli.tokens import token_app
from cohortflow.errors import OperatorError
from cohortflow.runtime.ports import PortInUse

app = typer.Typer(
    name="cohortflow",
    help=(
        "Durable, segment-triggered CRM campaigns on Temporal.\n\n"
        "Start here: `cohortflow demo` runs the whole stack on embedded defaults with the two "
        "example campaigns: a CDNOW win-back and an onboarding drip. `cohortflow up` runs the "
        "stack alone. "
        "Operators approve with `cohortflow approvals list` and `cohortflow approve ID`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database migrations (Alembic).", no_args_is_help=True)
app.add_typer(decisions_app)
app.add_typer(approvals_app, name="approvals")
app.add_typer(consent_app, name="consent")
app.add_typer(audit_app, name="audit")
app.add_typer(campaign_app, name="campaign")
app.add_typer(models_app, name="model")
app.add_typer(db_app, name="db")
app.add_typer(events_app, name="events")
app.add_typer(cohort_app, name="cohort")
app.add_typer(synth_app, name="synth")
app.add_typer(token_app, name="token")
app.add_typer(customer_app, name="customer")
app.command()(consume)


@app.command()
def up(
    data_dir: DataDir = None,
    temporal_port: Annotated[int | None, typer.Option(help="Temporal gRPC port.")] = None,
    ui_port: Annotated[int | None, typer.Option(help="Temporal Web UI port.")] = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP API port.")] = None,
    crm_port: Annotated[int | None, typer.Option(help="Sandbox CRM port.")] = None,
    log_format: LogFormat = None,
) -> None:
    """Run the whole stack on embedded defaults: Temporal, worker, HTTP API, sandbox CRM.

    The Temporal dev server keeps its state in a SQLite file and serves the Web UI. Ctrl-C
    stops everything; run again on the same --data-dir and every campaign in flight carries on.
    """
    from cohortflow.runtime.embedded import serve_forever

    settings = settings_for(
        data_dir=data_dir,
        temporal_port=temporal_port,
        temporal_ui_port=ui_port,
        api_port=api_port,
        crm_sandbox_port=crm_port,
        log_format=log_format,
    )
    setup_observability(settings, "cohortflow-up")
    serve_forever(settings, announce=lambda line: err.print(line, soft_wrap=True))


def _time_zone(value: str | None) -> str | None:
    """Refuse a zone name the zone database does not know, before anything starts."""
    if value is not None:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise typer.BadParameter(f"{value!r} is not an IANA time zone name") from exc
    return value


@app.command()
def demo(
    data_dir: DataDir = None,
    customers: Annotated[
        int, typer.Option(min=1, max=23570, help="CDNOW customers sampled for the win-back.")
    ] = 300,
    signups: Annotated[
        int,
        typer.Option(min=1, max=10_000, help="New customers signed up for the onboarding drip."),
    ] = 60,
    timezone: Annotated[
        str | None,
        typer.Option(
            callback=_time_zone,
            help="Put every demo customer in this IANA zone (default: spread around the globe, "
            "so quiet hours hold some back whatever the hour).",
        ),
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Keep serving after the summary.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    temporal_port: Annotated[int | None, typer.Option(help="Temporal gRPC port.")] = None,
    ui_port: Annotated[int | None, typer.Option(help="Temporal Web UI port.")] = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP API port.")] = None,
    crm_port: Annotated[int | None, typer.Option(help="Sandbox CRM port.")] = None,
) -> None:
    """Run the two example campaigns of `examples/` on the embedded stack.

    Win-back (winback_sensitive.yaml): trains a churn model on the shipped CDNOW log, stores
    a sample of customers and launches a campaign for the riskier half; high-value ones wait
    for an operator's approval, a stratified tenth is held out. Onboarding drip
    (onboarding_drip.yaml): signs new customers up through the HTTP API and launches the drip;
    a seeded share buys through the API while the drip waits, and is thanked.

    Prints a summary counted from Temporal visibility. A rerun on the same data directory
    launches nothing twice.
    """
    from cohortflow.demo.options import DemoOptions
    from cohortflow.runtime.embedded import run_demo

    settings = settings_for(
        data_dir=data_dir,
        temporal_port=temporal_port,
        temporal_ui_port=ui_port,
        api_port=api_port,
        crm_sandbox_port=crm_port,
    )
    setup_observability(settings, "cohortflow-demo")
    options = DemoOptions(customers=customers, signups=signups, timezone=timezone)
    run_demo(settings, options, serve=serve, as_json=as_json, out=out, err=err)


@app.command()
def worker(data_dir: DataDir = None, log_format: LogFormat = None) -> None:
    """Run a campaign worker (scale out by starting more). Connects to
    COHORTFLOW_TEMPORAL_ADDRESS, or the embedded server."""
    from cohortflow.runtime.services import run_worker

    settings = settings_for(data_dir=data_dir, log_format=log_format)
    setup_observability(settings, "cohortflow-worker")
    run(lambda: run_worker(settings))


@app.command()
def api(data_dir: DataDir = None, log_format: LogFormat = None) -> None:
    """Serve the HTTP API (approvals, consent, campaign controls, /healthz)."""
    from cohortflow.runtime.services import run_api

    settings = settings_for(data_dir=data_dir, log_format=log_format)
    setup_observability(settings, "cohortflow-api")
    run_api(settings)


@app.command("crm-sandbox")
def crm_sandbox(
    data_dir: DataDir = None,
    log_format: LogFormat = None,
    mode: Annotated[
        Literal["own", "hubspot"] | None,
        typer.Option(
            help="own (our dialect) or hubspot (HubSpot's wire format; requires "
            "COHORTFLOW_CRM_TOKEN when set). Env COHORTFLOW_CRM_SANDBOX_MODE.",
        ),
    ] = None,
) -> None:
    """Serve the sandbox CRM: a real HTTP CRM with its own SQLite store and rate limit."""
    from cohortflow.runtime.services import run_crm_sandbox

    settings = settings_for(data_dir=data_dir, log_format=log_format, crm_sandbox_mode=mode)
    setup_observability(settings, "cohortflow-crm-sandbox")
    run_crm_sandbox(settings)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up (COHORTFLOW_DATABASE_URL, or SQLite in the data dir)."""
    from cohortflow.storage.db import migrate

    settings = settings_for(data_dir=data_dir)
    run(lambda: migrate(settings.resolved_database_url, revision))
    err.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "base",
) -> None:
    """Migrate the database down."""
    from cohortflow.storage.db import downgrade

    settings = settings_for(data_dir=data_dir)
    run(lambda: downgrade(settings.resolved_database_url, revision))
    err.print(f"database at revision {revision}")


# ---------------------------------------------------------------------- operators


def main() -> None:
    """Run the CLI; exit codes are deterministic even after a Temporal worker ran."""
    code = 0
    try:
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except OperatorError as exc:
        code = _one_line(exc.message)
    except PortInUse as exc:
        code = _one_line(str(exc))
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as exc:
        # Usage errors (typer vendors click, so match by shape): one line, exit 2.
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        ctx = getattr(exc, "ctx", None)
        prefix = ctx.command_path if ctx is not None else "cohortflow"
        code = _one_line(f"{exc.format_message()}", prefix=prefix)
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreters that ran a Temporal worker can crash at exit (sdk-python#300).
    os._exit(code)


def _one_line(message: str, prefix: str = "cohortflow") -> int:
    """Print an error as one line on stderr; returns exit code 2."""
    text = " ".join(message.split())
    err.print(f"{prefix}: error: {text}", markup=False, highlight=False, soft_wrap=True)
    return 2
