"""The ``cohortflow`` command line: run the parts, launch the demo, operate campaigns.

Every operator error is one line on stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from cohortflow.errors import Invalid, OperatorError
from cohortflow.runtime.ports import PortInUse

T = TypeVar("T")

app = typer.Typer(
    name="cohortflow",
    help=(
        "Durable, segment-triggered CRM campaigns on Temporal.\n\n"
        "Start here: `cohortflow demo` runs the whole stack on embedded defaults and launches "
        "CDNOW customers through a win-back campaign. `cohortflow up` runs the stack alone. "
        "Operators approve with `cohortflow approvals list` and `cohortflow approve ID`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
approvals_app = typer.Typer(help="Approvals campaigns are waiting for.", no_args_is_help=True)
consent_app = typer.Typer(help="Consent per customer, channel and purpose.", no_args_is_help=True)
audit_app = typer.Typer(help="The append-only, hash-chained audit trail.", no_args_is_help=True)
campaign_app = typer.Typer(help="Pause, resume or cancel campaigns.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations (Alembic).", no_args_is_help=True)
app.add_typer(approvals_app, name="approvals")
app.add_typer(consent_app, name="consent")
app.add_typer(audit_app, name="audit")
app.add_typer(campaign_app, name="campaign")
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where embedded state lives (default ./.cohortflow; env COHORTFLOW_DATA_DIR).",
        show_default=False,
    ),
]
LogFormat = Annotated[
    Literal["console", "json"] | None,
    typer.Option("--log-format", help="console or json (env COHORTFLOW_LOG_FORMAT)."),
]
Operator = Annotated[str, typer.Option("--operator", help="Who decides (recorded in the audit).")]
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit).")]


def settings_for(**overrides: Any) -> Any:
    """Settings from the environment, with the command line's options on top."""
    from cohortflow.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise Invalid(f"{field}: {first['msg']}", field=field) from exc


def _run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await coro_factory()

    return asyncio.run(runner())


def _setup_observability(settings: Any, service: str) -> None:
    from cohortflow.observability import configure_logging, configure_tracing

    configure_logging(settings.log_format, settings.log_level)
    configure_tracing(settings.otel_console, service)


# ---------------------------------------------------------------------- processes


@app.command()
def up(
    data_dir: DataDir = None,
    temporal_port: Annotated[int | None, typer.Option(help="Temporal gRPC port.")] = None,
    ui_port: Annotated[int | None, typer.Option(help="Temporal Web UI port.")] = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP API port.")] = None,
    crm_port: Annotated[int | None, typer.Option(help="Sandbox CRM port.")] = None,
    log_format: LogFormat = None,
) -> None:
    """Run everything on embedded defaults: Temporal dev server (SQLite, Web UI), worker,
    HTTP API and sandbox CRM. Ctrl-C stops all; run again on the same --data-dir and every
    campaign in flight carries on."""
    from cohortflow.runtime.embedded import serve_forever

    settings = settings_for(
        data_dir=data_dir,
        temporal_port=temporal_port,
        temporal_ui_port=ui_port,
        api_port=api_port,
        crm_sandbox_port=crm_port,
        log_format=log_format,
    )
    _setup_observability(settings, "cohortflow-up")
    serve_forever(settings, announce=lambda line: err.print(line, soft_wrap=True))


@app.command()
def demo(
    data_dir: DataDir = None,
    customers: Annotated[
        int, typer.Option(min=1, max=23570, help="How many CDNOW customers to sample.")
    ] = 300,
    wait_seconds: Annotated[
        float, typer.Option(min=0.0, help="The campaign's durable wait between CRM steps.")
    ] = 5.0,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Keep serving after the summary.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    temporal_port: Annotated[int | None, typer.Option(help="Temporal gRPC port.")] = None,
    ui_port: Annotated[int | None, typer.Option(help="Temporal Web UI port.")] = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP API port.")] = None,
    crm_port: Annotated[int | None, typer.Option(help="Sandbox CRM port.")] = None,
) -> None:
    """Train a churn model on CDNOW, evaluate a cohort and launch one win-back campaign per
    entering customer on the embedded stack; print a summary counted from Temporal."""
    from cohortflow.demo import DemoOptions
    from cohortflow.runtime.embedded import run_demo

    settings = settings_for(
        data_dir=data_dir,
        temporal_port=temporal_port,
        temporal_ui_port=ui_port,
        api_port=api_port,
        crm_sandbox_port=crm_port,
    )
    _setup_observability(settings, "cohortflow-demo")
    options = DemoOptions(customers=customers, wait_seconds=wait_seconds)
    run_demo(settings, options, serve=serve, as_json=as_json, out=out, err=err)


@app.command()
def worker(data_dir: DataDir = None, log_format: LogFormat = None) -> None:
    """Run a campaign worker (scale out by starting more). Connects to
    COHORTFLOW_TEMPORAL_ADDRESS, or the embedded server."""
    from cohortflow.runtime.services import run_worker

    settings = settings_for(data_dir=data_dir, log_format=log_format)
    _setup_observability(settings, "cohortflow-worker")
    _run(lambda: run_worker(settings))


@app.command()
def api(data_dir: DataDir = None, log_format: LogFormat = None) -> None:
    """Serve the HTTP API (approvals, consent, campaign controls, /healthz)."""
    from cohortflow.runtime.services import run_api

    settings = settings_for(data_dir=data_dir, log_format=log_format)
    _setup_observability(settings, "cohortflow-api")
    run_api(settings)


@app.command("crm-sandbox")
def crm_sandbox(data_dir: DataDir = None, log_format: LogFormat = None) -> None:
    """Serve the sandbox CRM: a real HTTP CRM with its own SQLite store and rate limit."""
    from cohortflow.runtime.services import run_crm_sandbox

    settings = settings_for(data_dir=data_dir, log_format=log_format)
    _setup_observability(settings, "cohortflow-crm-sandbox")
    run_crm_sandbox(settings)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up (COHORTFLOW_DATABASE_URL, or SQLite in the data dir)."""
    from cohortflow.storage.db import migrate

    settings = settings_for(data_dir=data_dir)
    _run(lambda: migrate(settings.resolved_database_url, revision))
    err.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "base",
) -> None:
    """Migrate the database down."""
    from cohortflow.storage.db import downgrade

    settings = settings_for(data_dir=data_dir)
    _run(lambda: downgrade(settings.resolved_database_url, revision))
    err.print(f"database at revision {revision}")


# ---------------------------------------------------------------------- operators


async def _ready(settings: Any) -> Any:
    """Refuse to run against a database or data dir that was never set up; create nothing."""
    from cohortflow.errors import Unavailable
    from cohortflow.ids import KeyMissing, Pseudonymiser
    from cohortflow.storage.db import current_revision

    if await current_revision(settings.resolved_database_url) is None:
        raise Unavailable(
            "the database has no cohortflow schema: run `cohortflow up` (embedded) or "
            "`cohortflow db upgrade` first, with the same --data-dir or COHORTFLOW_DATABASE_URL"
        )
    try:
        return Pseudonymiser.from_settings(settings, create=False)
    except KeyMissing as exc:
        raise Unavailable(str(exc)) from exc


async def _with_controls(settings: Any, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action`` with Controls over the configured database and Temporal."""
    from cohortflow.controls import Controls
    from cohortflow.storage.db import Database
    from cohortflow.temporal_client import connect

    pseudonymiser = await _ready(settings)
    db = Database(settings.resolved_database_url)
    try:
        client = await connect(settings, tracing=False)
    except RuntimeError:
        client = None
    try:
        return await action(Controls(db, settings, pseudonymiser, client))
    finally:
        await db.dispose()


@approvals_app.command("list")
def approvals_list(
    data_dir: DataDir = None,
    status: Annotated[
        str, typer.Option(help="pending, approved, rejected, expired or all.")
    ] = "pending",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List approvals with customer key, scores, reason, requested and expiry times."""
    settings = settings_for(data_dir=data_dir)
    wanted = None if status == "all" else status
    rows = _run(lambda: _with_controls(settings, lambda c: c.list_approvals(wanted)))
    if as_json:
        for r in rows:
            out.print_json(
                json.dumps(
                    {
                        "approval_id": r.approval_id,
                        "workflow_id": r.workflow_id,
                        "customer_key": r.customer_key,
                        "scores": r.scores,
                        "reason": r.reason,
                        "status": r.status,
                        "requested_at": r.requested_at.isoformat(),
                        "expires_at": r.expires_at.isoformat(),
                    }
                )
            )
        return
    table = Table(title=f"Approvals ({status})")
    for column in ("id", "customer key", "scores", "reason", "requested", "expires", "status"):
        table.add_column(column)
    for r in rows:
        scores = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(r.scores.items()))
        table.add_row(
            r.approval_id,
            r.customer_key,
            scores,
            r.reason,
            f"{r.requested_at:%Y-%m-%d %H:%M}",
            f"{r.expires_at:%Y-%m-%d %H:%M}",
            r.status,
        )
    out.print(table)


def _decide(
    approval_id: str, approve: bool, operator: str, reason: str, data_dir: Path | None
) -> None:
    settings = settings_for(data_dir=data_dir)
    result = _run(
        lambda: _with_controls(
            settings,
            lambda c: c.decide(approval_id, approve=approve, operator=operator, reason=reason),
        )
    )
    out.print(f"{result.approval_id} {result.decision}")


@app.command()
def approve(
    approval_id: Annotated[str, typer.Argument(help="The approval id (apr_…).")],
    operator: Operator,
    reason: Reason,
    data_dir: DataDir = None,
) -> None:
    """Approve a pending approval; the campaign carries on at once."""
    _decide(approval_id, True, operator, reason, data_dir)


@app.command()
def reject(
    approval_id: Annotated[str, typer.Argument(help="The approval id (apr_…).")],
    operator: Operator,
    reason: Reason,
    data_dir: DataDir = None,
) -> None:
    """Reject a pending approval; the campaign ends as rejected."""
    _decide(approval_id, False, operator, reason, data_dir)


def _consent(
    customer: str, channel: str, purpose: str, granted: bool, data_dir: Path | None
) -> None:
    settings = settings_for(data_dir=data_dir)
    outcome = _run(
        lambda: _with_controls(
            settings,
            lambda c: c.set_consent(
                customer, channel=channel, purpose=purpose, granted=granted, source="cli"
            ),
        )
    )
    verb = "granted" if granted else "revoked"
    state = verb if outcome.changed else f"already {verb}"
    out.print(
        f"{outcome.customer_key} {channel}/{purpose} {state}; "
        f"{outcome.signalled} running campaign(s) told"
    )


Channel = Annotated[str, typer.Option("--channel", help="e.g. email, sms, push.")]
Purpose = Annotated[str, typer.Option("--purpose", help="e.g. marketing.")]
CustomerArg = Annotated[str, typer.Argument(help="The source customer id (pseudonymised here).")]


@consent_app.command("grant")
def consent_grant(
    customer: CustomerArg, channel: Channel, purpose: Purpose, data_dir: DataDir = None
) -> None:
    """Grant consent for a channel and purpose."""
    _consent(customer, channel, purpose, True, data_dir)


@consent_app.command("revoke")
def consent_revoke(
    customer: CustomerArg, channel: Channel, purpose: Purpose, data_dir: DataDir = None
) -> None:
    """Revoke consent; running campaigns of the customer stop before their next action."""
    _consent(customer, channel, purpose, False, data_dir)


def _campaign(
    campaign_id: str, action: str, operator: str, reason: str, data_dir: Path | None
) -> None:
    settings = settings_for(data_dir=data_dir)
    outcome = _run(
        lambda: _with_controls(
            settings,
            lambda c: c.change_campaign(campaign_id, action, operator=operator, reason=reason),
        )
    )
    out.print(f"{outcome.campaign_id} {outcome.status}; {outcome.workflows} running workflow(s)")


CampaignArg = Annotated[str, typer.Argument(help="The campaign id.")]


@campaign_app.command("pause")
def campaign_pause(
    campaign_id: CampaignArg, operator: Operator, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Hold every outbound action of the campaign's running workflows."""
    _campaign(campaign_id, "pause", operator, reason, data_dir)


@campaign_app.command("resume")
def campaign_resume(
    campaign_id: CampaignArg, operator: Operator, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Let paused campaigns act again."""
    _campaign(campaign_id, "resume", operator, reason, data_dir)


@campaign_app.command("cancel")
def campaign_cancel(
    campaign_id: CampaignArg, operator: Operator, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Cancel the campaign: running workflows exit, no new outbound action is made."""
    _campaign(campaign_id, "cancel", operator, reason, data_dir)


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Recompute every hash of the chain; exit 1 and name the first bad row if broken."""
    from cohortflow.storage.audit import verify_chain
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)

    async def verify() -> Any:
        await _ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            async with db.read_transaction() as session:
                return await verify_chain(session)
        finally:
            await db.dispose()

    report = _run(verify)
    if report.ok:
        out.print(f"audit chain ok: {report.rows} rows")
        return
    err.print(f"audit chain BROKEN at seq {report.first_bad_seq}: {report.problem}")
    raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    customer: Annotated[str, typer.Option("--customer", help="Source customer id.")],
    data_dir: DataDir = None,
) -> None:
    """Print one customer's decisions, oldest first (the id is pseudonymised at lookup)."""
    from cohortflow.storage.audit import audit_for_customer
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)
    key = ""

    async def show() -> Any:
        nonlocal key
        key = (await _ready(settings)).customer_key(customer)
        db = Database(settings.resolved_database_url)
        try:
            async with db.transaction() as session:
                return await audit_for_customer(session, key)
        finally:
            await db.dispose()

    rows = _run(show)
    table = Table(title=f"Audit trail of {key}")
    for column in ("seq", "time", "workflow", "step", "kind", "payload"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r.seq), r.created_at, r.workflow_id, r.step_id, r.kind, r.payload)
    out.print(table)
    if not rows:
        err.print(f"no audit rows for customer {customer!r}")


# ---------------------------------------------------------------------- entry point


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
