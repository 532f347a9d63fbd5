"""Operator commands: approvals and consent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

if TYPE_CHECKING:
    from cohortflow.auth.identity import Identity
    from cohortflow.campaigns.bulk import BulkSummary
    from cohortflow.campaigns.controls import Controls
    from cohortflow.storage.tables import Approval

from cohortflow.cli.common import (
    DataDir,
    Reason,
    control,
    err,
    out,
    print_line,
    ready,
    run,
    settings_for,
)
from cohortflow.errors import Invalid

approvals_app = typer.Typer(help="Approvals campaigns are waiting for.", no_args_is_help=True)
consent_app = typer.Typer(help="Consent per customer, channel and purpose.", no_args_is_help=True)
decisions_app = typer.Typer()


_RULES = """
Who may decide: a token (COHORTFLOW_TOKEN) or the local identity (COHORTFLOW_LOCAL_IDENTITY,
default the system user) with a role the campaign allows (by default approver), whose scope
reaches the campaign, who is not the campaign's owner, nor the author or applier of its
version, and, when the spec lists approvers, one of them. A spec with approval.required N
waits for N distinct approvers; one rejection ends it.
"""


@approvals_app.command("list")
def approvals_list(
    data_dir: DataDir = None,
    status: Annotated[
        str, typer.Option(help="pending, approved, rejected, expired or all.")
    ] = "pending",
    campaign: Annotated[
        str | None, typer.Option("--campaign", help="Only this campaign's approvals.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column, however wide.")] = False,
) -> None:
    """List approvals, newest first: id, campaign, customer key, scores, expiry (marked !
    once the request was escalated, unanswered, ahead of it)."""
    wanted = None if status == "all" else status
    rows = control(data_dir, lambda c, who: c.list_approvals(who, wanted, campaign))
    if as_json:
        for r in rows:
            print_line(json.dumps(_approval_json(r)))
        return
    out.print(_approvals_table(rows, status, wide=wide))


@approvals_app.command("show")
def approvals_show(
    approval_id: Annotated[str, typer.Argument(help="The approval id (apr_…).")],
    data_dir: DataDir = None,
) -> None:
    """One approval with what it takes to decide it: cohort, version, scores with their
    model versions and top contributions, the CRM writes it would allow, time left."""
    found = control(data_dir, lambda c, who: c.approval_context(who, approval_id))
    r = found.approval
    print_line(f"{r.approval_id}  {r.status}  campaign {r.campaign_id} v{found.campaign_version}")
    print_line(f"customer {r.customer_key}  cohort {found.cohort_id}  reason: {r.reason}")
    hours = found.waited_seconds / 3600
    left = found.expires_in_seconds / 3600
    print_line(f"waiting {hours:.1f} h; expires {r.expires_at:%Y-%m-%d %H:%M}Z (in {left:.1f} h)")
    if r.escalated_at:
        print_line(f"escalated {r.escalated_at:%Y-%m-%d %H:%M}Z, unanswered as its expiry neared")
    for model, value in sorted(r.scores.items()):
        version = found.model_versions.get(model, "?")
        print_line(f"  {model} {float(value):.3f} (model {version}), mostly from:")
        for c in found.top_contributions.get(model, []):
            print_line(f"    {c['feature']} {float(c['value']):+.2f}")
    for action in found.proposed:
        target = action.target or ", ".join(sorted(action.properties))
        print_line(f"  then {action.step_id}: {action.action} {target}")
    if r.approved_by:
        print_line(f"approved so far by {', '.join(r.approved_by)}")
    if r.decided_by:
        print_line(f"decided by {r.decided_by}: {r.decision_reason}")


def _approval_json(r: Approval) -> dict[str, Any]:
    return {
        "approval_id": r.approval_id,
        "workflow_id": r.workflow_id,
        "campaign_id": r.campaign_id,
        "customer_key": r.customer_key,
        "scores": r.scores,
        "reason": r.reason,
        "status": r.status,
        "approved_by": r.approved_by,
        "decided_by": r.decided_by,
        "requested_at": r.requested_at.isoformat(),
        "expires_at": r.expires_at.isoformat(),
        "escalated_at": r.escalated_at.isoformat() if r.escalated_at else None,
    }


def _approvals_table(rows: list[Approval], status: str, *, wide: bool) -> Table:
    """At 80 columns: id, campaign, key (shortened), scores, expiry; ``wide`` adds the rest."""
    table = Table(title=f"Approvals ({status})", expand=False)
    columns = ["id", "campaign", "customer", "scores", "expires"]
    if wide:
        columns += ["reason", "requested", "status", "decided by"]
    for column in columns:
        table.add_column(column, no_wrap=column in ("id", "customer"), overflow="fold")
    for r in rows:
        scores = " ".join(f"{k[:5]} {float(v):.2f}" for k, v in sorted(r.scores.items()))
        key = r.customer_key if wide else f"{r.customer_key[:10]}…"
        expires = f"{r.expires_at:%m-%d %H:%M}" + (" !" if r.escalated_at else "")
        cells = [r.approval_id, r.campaign_id, key, scores, expires]
        if wide:
            cells += [
                r.reason,
                f"{r.requested_at:%Y-%m-%d %H:%M}",
                r.status,
                r.decided_by or ", ".join(r.approved_by),
            ]
        table.add_row(*cells)
    return table


def _decide(approval_id: str, approve: bool, reason: str, data_dir: Path | None) -> None:
    result = control(
        data_dir,
        lambda c, who: c.decide(approval_id, approve=approve, identity=who, reason=reason),
    )
    more = f"; {result.remaining} more approval(s) needed" if result.remaining else ""
    out.print(f"{result.approval_id} {result.decision}{more}")


ApprovalArg = Annotated[str, typer.Argument(help="The approval id (apr_…).")]


@decisions_app.command(
    epilog=_RULES + "\nExample: cohortflow approve apr_0123456789ab --reason 'offer within budget'"
)
def approve(approval_id: ApprovalArg, reason: Reason, data_dir: DataDir = None) -> None:
    """Approve a pending approval as this command's identity; the campaign carries on once
    enough approvers have approved."""
    _decide(approval_id, True, reason, data_dir)


@decisions_app.command(
    epilog=_RULES + "\nExample: cohortflow reject apr_0123456789ab --reason 'too generous'"
)
def reject(approval_id: ApprovalArg, reason: Reason, data_dir: DataDir = None) -> None:
    """Reject a pending approval as this command's identity; the campaign ends as rejected."""
    _decide(approval_id, False, reason, data_dir)


@approvals_app.command(
    "decide",
    epilog=_RULES + "\nExample: cohortflow approvals decide approve --campaign winback_sensitive"
    " --score churn --min 0.8 --older-than PT2H --reason 'reviewed as a batch'",
)
def approvals_decide(
    decision: Annotated[str, typer.Argument(help="approve or reject.")],
    reason: Reason,
    campaign: Annotated[str | None, typer.Option("--campaign", help="Only this campaign.")] = None,
    cohort: Annotated[
        str | None, typer.Option("--cohort", help="Only campaigns entered from this cohort.")
    ] = None,
    score: Annotated[
        str | None, typer.Option("--score", help="The model score --min/--max bound.")
    ] = None,
    min_score: Annotated[float | None, typer.Option("--min", help="Score at least.")] = None,
    max_score: Annotated[float | None, typer.Option("--max", help="Score at most.")] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Waiting at least (ISO-8601, PT2H).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Decide every pending approval matching the filter, each through its own campaign with
    the same checks as `approve`; prints how many were decided, refused or already decided.
    Interrupted, run it again: only what is still pending is decided."""
    from cohortflow.campaigns.bulk import ApprovalFilter, decide_all, matching, waiting_at_least

    if decision not in ("approve", "reject"):
        raise Invalid(f"decision: {decision!r} is neither approve nor reject", field="decision")
    criteria = ApprovalFilter(
        campaign_id=campaign,
        cohort_id=cohort,
        score=score,
        min_score=min_score,
        max_score=max_score,
        older_than=waiting_at_least(older_than),
    )

    async def bulk(controls: Controls, who: Identity) -> BulkSummary:
        rows = await matching(controls, who, criteria)
        if rows and not yes and not typer.confirm(f"{decision} {len(rows)} approval(s)?"):
            raise typer.Exit(1)
        with Progress(transient=True, console=err) as bar:
            task = bar.add_task(decision, total=len(rows))
            return await decide_all(
                controls,
                who,
                rows,
                approve=decision == "approve",
                reason=reason,
                progress=lambda done, _: bar.update(task, completed=done),
            )

    summary = control(data_dir, bulk)
    print_line(
        f"matched {summary.matched}: {summary.decided} {decision.rstrip('e')}ed, "
        f"{summary.refused} refused by validation, {summary.already_decided} already decided"
    )
    for why, count in sorted(summary.refusals.items()):
        print_line(f"  {count} × {why}")


def _consent(
    customer: str,
    channel: str,
    purpose: str,
    granted: bool,
    policy_version: str | None,
    data_dir: Path | None,
) -> None:
    outcome = control(
        data_dir,
        lambda c, who: c.set_consent(
            customer,
            channel=channel,
            purpose=purpose,
            granted=granted,
            source="cli",
            identity=who,
            how="cli",
            policy_version=policy_version,
        ),
    )
    verb = "granted" if granted else "revoked"
    state = verb if outcome.changed else f"already {verb}"
    told = f"{outcome.signalled} running campaign(s) told"
    if outcome.temporal == "unreachable":
        told = "Temporal did not answer: the API's relay tells running campaigns once it does"
    out.print(f"{outcome.customer_key} {channel}/{purpose} {state}; {told}")


Channel = Annotated[str, typer.Option("--channel", help="e.g. email, sms, push.")]
Purpose = Annotated[str, typer.Option("--purpose", help="e.g. marketing.")]
CustomerArg = Annotated[str, typer.Argument(help="The source customer id (pseudonymised here).")]


PolicyVersion = Annotated[
    str | None,
    typer.Option("--policy-version", help="The consent text or policy version the customer saw."),
]


@consent_app.command("grant")
def consent_grant(
    customer: CustomerArg,
    channel: Channel,
    purpose: Purpose,
    policy_version: PolicyVersion = None,
    data_dir: DataDir = None,
) -> None:
    """Grant consent for a channel and purpose (kept as evidence: see `consent history`)."""
    _consent(customer, channel, purpose, True, policy_version, data_dir)


@consent_app.command("revoke")
def consent_revoke(
    customer: CustomerArg,
    channel: Channel,
    purpose: Purpose,
    policy_version: PolicyVersion = None,
    data_dir: DataDir = None,
) -> None:
    """Revoke consent; running campaigns of the customer stop before their next action."""
    _consent(customer, channel, purpose, False, policy_version, data_dir)


@consent_app.command("history")
def consent_history(
    customer: Annotated[str, typer.Argument(help="Customer key (c_…) or source customer id.")],
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every consent decision of a customer, oldest first: when, what, whether it changed
    anything, how it came (api, cli, import, seed, system), by whom, from which source and
    with which policy version. Exit 2 for a customer never seen."""
    from cohortflow.errors import NotFound
    from cohortflow.storage import consent
    from cohortflow.storage.customers import get_customer
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)

    async def load() -> list[dict[str, Any]]:
        key = (await ready(settings)).resolve(customer)
        db = Database(settings.resolved_database_url)
        try:
            async with db.transaction() as session:
                rows = await consent.history(session, key)
                if not rows and await get_customer(session, key) is None:
                    raise NotFound(f"customer: no customer {customer!r}", field="customer")
        finally:
            await db.dispose()
        return [
            {
                "at": r.at.isoformat(),
                "customer_key": r.customer_key,
                "channel": r.channel,
                "purpose": r.purpose,
                "granted": r.granted,
                "changed": r.changed,
                "how": r.how,
                "by": r.by,
                "source": r.source,
                "policy_version": r.policy_version,
            }
            for r in rows
        ]

    for row in run(load):
        if as_json:
            print_line(json.dumps(row))
            continue
        verb = "granted" if row["granted"] else "revoked"
        change = "" if row["changed"] else " (no change)"
        policy_note = f", policy {row['policy_version']}" if row["policy_version"] else ""
        print_line(
            f"{row['at'][:19]}Z {row['channel']}/{row['purpose']} {verb}{change} "
            f"via {row['how']} by {row['by']}, source {row['source']}{policy_note}"
        )


# ---------------------------------------------------------------------- entry point
