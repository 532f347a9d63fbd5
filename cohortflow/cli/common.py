"""What every cohortflow command shares: consoles, common options, settings, the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from cohortflow.errors import Invalid
from cohortflow.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client

    from cohortflow.auth.identity import Identity
    from cohortflow.campaigns.controls import Controls
    from cohortflow.pseudonymisation import Pseudonymiser
    from cohortflow.storage.db import Database

T = TypeVar("T")

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
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit).")]


def settings_for(**overrides: Any) -> Settings:
    """Settings from the environment, with the command line's options on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise Invalid(f"{field}: {first['msg']}", field=field) from exc


def run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run one coroutine on a fresh event loop (each command is one short program)."""

    async def runner() -> T:
        return await coro_factory()

    return asyncio.run(runner())


def setup_observability(settings: Settings, service: str) -> None:
    """Structured logs and, when asked, tracing to the console or over OTLP for this process."""
    from cohortflow.observability import configure_logging, configure_tracing

    configure_logging(settings.log_format, settings.log_level)
    configure_tracing(settings.otel_console, service, settings.otel_exporter_otlp_endpoint)


# ---------------------------------------------------------------------- processes


async def ready(settings: Settings) -> Pseudonymiser:
    """Refuse to run against a database or data dir that was never set up; create nothing."""
    from cohortflow.errors import Unavailable
    from cohortflow.pseudonymisation import KeyMissing, Pseudonymiser
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


def embedded_endpoints(settings: Settings) -> Settings:
    """``settings`` pointed at the embedded stack last started on its data dir.

    Only when Temporal is embedded and neither the environment nor an option chose its host
    or port; a missing or unreadable file leaves ``settings`` as they are.
    """
    import json

    chosen = {"temporal_address", "temporal_host", "temporal_port"} & settings.model_fields_set
    path = settings.stack_file
    if not settings.embedded_temporal or chosen or not path.is_file():
        return settings
    try:
        stack = json.loads(path.read_text())
        update = {
            "temporal_host": str(stack["temporal_host"]),
            "temporal_port": int(stack["temporal_port"]),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return settings
    return settings.model_copy(update=update)


async def identity_of(settings: Settings, db: Database) -> Identity:
    """Who this command acts as: the token in ``COHORTFLOW_TOKEN`` when set, else the
    configured local identity (a command run on the server's own machine)."""
    import getpass

    from cohortflow.auth.identity import Identity, Role
    from cohortflow.auth.tokens import TokenService

    if settings.token is not None:
        return await TokenService(db).authenticate(settings.token.get_secret_value())
    return Identity(
        name=settings.local_identity or getpass.getuser(),
        roles=frozenset(Role(r) for r in settings.local_roles),
        token_id="local",
    )


def control(data_dir: Path | None, action: Callable[[Controls, Identity], Awaitable[T]]) -> T:
    """Run one operator ``action``, as this command's identity, over the data dir's (or
    configured) database and Temporal."""
    settings = settings_for(data_dir=data_dir)
    return run(lambda: _with_controls(settings, action))


@dataclass(frozen=True)
class OperatorSession:
    """What an operator command acts with: resolved settings, the key maker, the database,
    Temporal (None when unreachable) and who is asking."""

    settings: Settings
    pseudonymiser: Pseudonymiser
    db: Database
    client: Client | None
    identity: Identity


@asynccontextmanager
async def operator_session(settings: Settings) -> AsyncIterator[OperatorSession]:
    """An :class:`OperatorSession` over the configured (or embedded) database and Temporal,
    as this command's identity; the database is disposed of on exit."""
    from cohortflow.storage.db import Database
    from cohortflow.temporal_client import connect

    pseudonymiser = await ready(settings)
    settings = embedded_endpoints(settings)
    # Logs go to stderr (structlog's default is stdout), so stdout holds only the result;
    # configured after ready(), whose schema check would log Alembic's INFO lines.
    setup_observability(settings, "cohortflow-cli")
    db = Database(settings.resolved_database_url)
    try:
        try:
            client = await connect(settings, tracing=False)
        except RuntimeError:
            client = None
        identity = await identity_of(settings, db)
        yield OperatorSession(settings, pseudonymiser, db, client, identity)
    finally:
        await db.dispose()


async def _with_controls(
    settings: Settings, action: Callable[[Controls, Identity], Awaitable[T]]
) -> T:
    """Run ``action`` with Controls over the configured database and Temporal."""
    from cohortflow.campaigns.controls import Controls

    async with operator_session(settings) as s:
        controls = Controls(s.db, s.settings, s.pseudonymiser, s.client)
        return await action(controls, s.identity)


def print_line(text: str) -> None:
    """One line on stdout, never wrapped or coloured (for scripts)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)
