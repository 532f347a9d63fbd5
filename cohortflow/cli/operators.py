"""Operator commands: approvals, consent and the audit trail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cohortflow.cli.common import (
    DataDir,
    Operator,
    Reason,
    control,
    err,
    out,
    print_line,
    ready,
    run,
    settings_for,
)

approvals_app = typer.Typer(help="Approvals campaigns are waiting for.", no_args_is_help=True)
consent_app = typer.Typer(help="Consent per customer, channel and purpose.", no_args_is_help=True)
audit_app = typer.Typer(help="The append-only, hash-chained audit trail.", no_args_is_help=True)
decisions_app = typer.Typer()


@approvals_app.command("list")
def approvals_list(
    data_dir: DataDir = None,
    status: Annotated[
        str, typer.Option(help="pending, approved, rejected, expired or all.")
    ] = "pending",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List approvals with customer key, scores, reason, requested and expiry times."""
    wanted = None if status == "all" else status
    rows = control(data_dir, lambda c: c.list_approvals(wanted))
    if as_json:
        for r in rows:
            print_line(
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
    for column in ("id", "customer key"):
        table.add_column(column, no_wrap=True)
    for column in ("scores", "reason", "requested", "expires", "status"):
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
    result = control(
        data_dir,
        lambda c: c.decide(approval_id, approve=approve, operator=operator, reason=reason),
    )
    out.print(f"{result.approval_id} {result.decision}")


@decisions_app.command()
def approve(
    approval_id: Annotated[str, typer.Argument(help="The approval id (apr_…).")],
    operator: Operator,
    reason: Reason,
    data_dir: DataDir = None,
) -> None:
    """Approve a pending approval; the campaign carries on at once."""
    _decide(approval_id, True, operator, reason, data_dir)


@decisions_app.command()
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
    outcome = control(
        data_dir,
        lambda c: c.set_consent(
            customer, channel=channel, purpose=purpose, granted=granted, source="cli"
        ),
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


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Recompute every hash of the chain; exit 1 and name the first bad row if broken."""
    from cohortflow.storage.audit import verify_chain
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)

    async def verify() -> Any:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            async with db.read_transaction() as session:
                return await verify_chain(session)
        finally:
            await db.dispose()

    report = run(verify)
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
        key = (await ready(settings)).customer_key(customer)
        db = Database(settings.resolved_database_url)
        try:
            async with db.transaction() as session:
                return await audit_for_customer(session, key)
        finally:
            await db.dispose()

    rows = run(show)
    table = Table(title=f"Audit trail of {key}")
    for column in ("seq", "time", "workflow", "step", "kind", "payload"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r.seq), r.created_at, r.workflow_id, r.step_id, r.kind, r.payload)
    out.print(table)
    if not rows:
        err.print(f"no audit rows for customer {customer!r}")


# ---------------------------------------------------------------------- entry point
