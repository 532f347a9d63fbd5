"""Customer commands: erasure (``forget``) and legal holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from cohortflow.cli.common import DataDir, err, operator_session, print_line, run, settings_for

if TYPE_CHECKING:
    from cohortflow.auth.identity import Identity
    from cohortflow.erasure import Forgetter
    from cohortflow.settings import Settings

T = TypeVar("T")

customer_app = typer.Typer(
    help="Customers: erasure of their personal data, and legal holds.", no_args_is_help=True
)
CustomerArg = Annotated[str, typer.Argument(help="Customer key (c_…) or source customer id.")]


async def _with_forgetter(
    settings: Settings, action: Callable[[Forgetter, Identity], Awaitable[T]]
) -> T:
    """Run ``action`` on a :class:`Forgetter` as this command's identity."""
    from cohortflow.crm.factory import configured_connector
    from cohortflow.erasure import Forgetter

    async with operator_session(settings) as s:
        connector = configured_connector(s.settings)
        try:
            forgetter = Forgetter(s.db, s.pseudonymiser, connector, s.client)
            return await action(forgetter, s.identity)
        finally:
            await connector.aclose()


@customer_app.command("forget")
def forget(
    customer: CustomerArg,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")],
    export_dir: Annotated[
        Path | None,
        typer.Option(
            "--export-dir",
            help="Where a held customer's audit trail is exported (default: exports/ in the"
            " data directory).",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Erase a customer's personal data (contact details, raw id, event properties, consent
    texts), stop their campaigns and delete their CRM contact; the audit chain still
    verifies. A customer under legal hold is exported instead and refused (exit 2)."""
    settings = settings_for(data_dir=data_dir)
    target = export_dir or settings.data_dir / "exports"
    done = run(
        lambda: _with_forgetter(settings, lambda f, who: f.forget(customer, who, reason, target))
    )
    stopped = "not reached" if done.campaigns_terminated is None else done.campaigns_terminated
    e = done.erased
    print_line(
        f"{done.customer_key} erased: {e.events} events, {e.aliases} aliases, "
        f"{e.consent_texts} consent texts, {e.consents_revoked} consents revoked, "
        f"{e.memberships} cohort memberships; campaigns terminated: {stopped}; "
        f"CRM contact {'deleted' if done.crm_deleted else 'NOT deleted'}"
    )
    if not done.crm_deleted:
        err.print(f"the CRM refused the delete ({done.crm_error}): run forget again")
        raise typer.Exit(1)


@customer_app.command("hold")
def hold(
    customer: CustomerArg,
    reason: Annotated[str, typer.Option("--reason", help="Why the data must be kept.")],
    data_dir: DataDir = None,
) -> None:
    """Put a customer under legal hold: `forget` exports instead of erasing."""
    settings = settings_for(data_dir=data_dir)
    key = run(lambda: _with_forgetter(settings, lambda f, who: f.hold(customer, who, reason)))
    print_line(f"{key} under legal hold: {reason}")


@customer_app.command("release")
def release(customer: CustomerArg, data_dir: DataDir = None) -> None:
    """Lift a customer's legal hold."""
    settings = settings_for(data_dir=data_dir)
    key = run(lambda: _with_forgetter(settings, lambda f, who: f.hold(customer, who, None)))
    print_line(f"{key} released from legal hold")
