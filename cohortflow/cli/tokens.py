"""``cohortflow token``: issue, list and revoke API tokens (needs the admin role)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cohortflow.cli.common import (
    DataDir,
    err,
    identity_of,
    out,
    print_line,
    ready,
    run,
    settings_for,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from cohortflow.auth.identity import Identity
    from cohortflow.auth.tokens import TokenService

token_app = typer.Typer(
    help=(
        "API tokens. Roles: ingest (post events), operator (read approvals, cohorts and "
        "models; pause and resume), approver (decide approvals, within --campaign/--tag "
        "scope), admin (tokens, campaigns, cohorts, consent corrections, cancel). Roles do "
        "not imply one another. Only the token's hash is stored: the secret is shown once."
    ),
    no_args_is_help=True,
)


def _as_admin(data_dir: Any, action: Callable[[TokenService, Identity], Awaitable[Any]]) -> Any:
    """Run ``action`` with the token service, as this command's identity, if it is an admin."""
    from cohortflow.auth import policy
    from cohortflow.auth.tokens import TokenService
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)

    async def go() -> Any:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            who = await identity_of(settings, db)
            policy.require(who, policy.ADMIN, "manage tokens")
            return await action(TokenService(db), who)
        finally:
            await db.dispose()

    return run(go)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", help="Who or what the token is for.")],
    role: Annotated[
        list[str], typer.Option("--role", help="ingest, operator, approver or admin; repeat.")
    ],
    expires_in: Annotated[
        str, typer.Option("--expires-in", help="ISO-8601 duration, at most P366D.")
    ] = "P90D",
    campaign: Annotated[
        list[str] | None, typer.Option("--campaign", help="Scope to this campaign; repeat.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Scope to campaigns with this tag.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Issue a token and print its secret, once.

    Example: cohortflow token create --name alice --role approver --tag winback
    """
    from cohortflow.errors import Invalid
    from cohortflow.spec import parse_duration

    try:
        lifetime = parse_duration(expires_in)
    except ValueError as exc:
        raise Invalid(f"--expires-in: {exc}", field="expires_in") from exc
    issued = _as_admin(
        data_dir,
        lambda tokens, who: tokens.create(
            name, role, lifetime=lifetime, by=who.name, campaigns=campaign, tags=tag
        ),
    )
    err.print(f"token {issued.row.token_id} for {name}; the secret is shown only now:")
    print_line(issued.secret)


@token_app.command("list")
def token_list(
    all_tokens: Annotated[bool, typer.Option("--all", help="Revoked and expired too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List tokens (never their secrets)."""
    rows = _as_admin(data_dir, lambda tokens, _: tokens.list(include_inactive=all_tokens))
    if as_json:
        for r in rows:
            print_line(
                json.dumps(
                    {
                        "token_id": r.token_id,
                        "name": r.name,
                        "roles": r.roles,
                        "campaigns": r.campaigns,
                        "tags": r.tags,
                        "expires_at": r.expires_at.isoformat(),
                        "revoked": r.revoked_at is not None,
                    }
                )
            )
        return
    table = Table(title="API tokens")
    for column in ("id", "name", "roles", "scope", "expires", "state"):
        table.add_column(column, overflow="fold")
    for r in rows:
        scope = ", ".join([*r.campaigns, *(f"#{t}" for t in r.tags)]) or "all"
        state = "revoked" if r.revoked_at else "active"
        table.add_row(
            r.token_id, r.name, ",".join(r.roles), scope, f"{r.expires_at:%Y-%m-%d}", state
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (from `token list`).")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a token: the next request made with it answers 401."""
    row = _as_admin(data_dir, lambda tokens, who: tokens.revoke(token_id, by=who.name))
    out.print(f"token {row.token_id} ({row.name}) revoked")
