"""The audit trail's commands: verify (the store or an export), anchor, export, show."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich.table import Table

from cohortflow.cli.common import (
    DataDir,
    err,
    out,
    print_line,
    ready,
    run,
    settings_for,
    setup_observability,
)
from cohortflow.errors import Invalid

if TYPE_CHECKING:
    from cohortflow.audit.chain import Anchor
    from cohortflow.audit.export import Selection
    from cohortflow.settings import Settings

audit_app = typer.Typer(help="The append-only, hash-chained audit trail.", no_args_is_help=True)


AnchorFile = Annotated[
    Path | None,
    typer.Option(
        "--anchor",
        help="A file of anchors (`cohortflow audit anchor`): the chain must still reach the"
        " last one, or its tail was cut.",
    ),
]


ExportFile = Annotated[
    Path | None,
    typer.Option(
        "--file",
        help="Check this export (`cohortflow audit export`) offline, with no database.",
    ),
]


def _anchors(anchor: Path | None) -> list[Anchor]:
    """The anchors recorded in ``anchor`` (none without one); exit 2 on an unreadable file."""
    from cohortflow.audit.chain import Anchor

    if anchor is None:
        return []
    try:
        lines = anchor.read_text(encoding="utf-8").splitlines()
        anchors = [Anchor.from_json(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise Invalid(f"anchor: {exc}", field="anchor") from exc
    if not anchors:
        raise Invalid(f"anchor: {anchor} holds no anchor", field="anchor")
    return anchors


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDir = None, anchor: AnchorFile = None, file: ExportFile = None
) -> None:
    """Recompute every hash of the chain; exit 1 and name the first bad row if broken, or,
    with --anchor, when the chain no longer reaches the last recorded head. With --file,
    check an export instead, offline, naming its first bad line."""
    from cohortflow.storage.audit import anchor_problem, verify_chain
    from cohortflow.storage.db import Database

    anchors = _anchors(anchor)
    if file is not None:
        _verify_export(file, anchors[-1] if anchors else None)
        return
    settings = settings_for(data_dir=data_dir)

    async def verify() -> tuple[Any, str]:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            async with db.read_transaction() as session:
                report = await verify_chain(session)
                problem = ""
                if report.ok and anchors:
                    problem = await anchor_problem(session, report, anchors[-1])
                return report, problem
        finally:
            await db.dispose()

    report, problem = run(verify)
    if not report.ok:
        err.print(f"audit chain BROKEN at seq {report.first_bad_seq}: {report.problem}")
        raise typer.Exit(1)
    if problem:
        err.print(f"audit chain CUT: {problem}")
        raise typer.Exit(1)
    reached = f"; reaches its anchor of {anchors[-1].at}" if anchors else ""
    out.print(f"audit chain ok: {report.rows} rows{reached}")


def _verify_export(file: Path, anchor: Anchor | None) -> None:
    """``audit verify --file``: exit 1 naming the first bad line, 2 for no such file."""
    from cohortflow.audit.export_file import verify_export

    try:
        with file.open(encoding="utf-8") as lines:
            report = verify_export(lines, anchor)
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"file: {exc}", field="file") from exc
    if not report.ok:
        err.print(f"audit export BROKEN at line {report.bad_line}: {report.problem}", markup=False)
        raise typer.Exit(1)
    assert report.header is not None
    head = report.header
    selection = ", ".join(f"{k} {v}" for k, v in head.selection.items())
    reached = f"; reaches its anchor of {anchor.at}" if report.anchor_checked and anchor else ""
    print_line(
        f"audit export ok: {report.rows} rows ({selection}), {report.evidence} more proven by"
        f" their hashes, up to head seq {head.head_seq} {head.head_hash}{reached}"
    )
    for note in report.notes:
        err.print(f"note: {note}", markup=False)


@audit_app.command("anchor")
def audit_anchor(
    data_dir: DataDir = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Append the anchor here (default: audit-anchors.jsonl in"
            " the data directory). Keep a copy where the database's owners cannot write.",
        ),
    ] = None,
) -> None:
    """Record the chain's head (its last seq and hash) after verifying the chain, in a file
    and the log, so `audit verify --anchor FILE` can tell when rows were cut from the tail."""
    import structlog

    from cohortflow.audit.chain import Anchor
    from cohortflow.storage.audit import verify_chain
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)
    target = file or settings.data_dir / "audit-anchors.jsonl"

    async def head() -> Any:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            async with db.read_transaction() as session:
                return await verify_chain(session)
        finally:
            await db.dispose()

    report = run(head)
    if not report.ok:
        err.print(f"audit chain BROKEN at seq {report.first_bad_seq}: {report.problem}")
        raise typer.Exit(1)
    anchor = Anchor(report.rows, report.head_hash, datetime.now(UTC).isoformat())
    with target.open("a", encoding="utf-8") as f:
        f.write(anchor.to_json() + "\n")
    # The log (stderr, structured as configured) is the anchor's second copy.
    setup_observability(settings, "cohortflow-audit")
    structlog.get_logger(__name__).info("audit anchored", seq=anchor.seq, hash=anchor.hash)
    out.print(f"anchored seq {anchor.seq} {anchor.hash} in {target}")


def _since(text: str | None) -> datetime | None:
    """``--since`` as a UTC datetime: ISO-8601, a date alone meaning its UTC midnight."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise Invalid(f"since: {text!r} is not an ISO-8601 date or time", field="since") from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@audit_app.command("export")
def audit_export(
    customer: Annotated[
        str | None,
        typer.Option("--customer", help="This customer's rows (key c_… or source id)."),
    ] = None,
    campaign: Annotated[
        str | None, typer.Option("--campaign", help="This campaign's rows.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Rows from this time on (ISO-8601; UTC if no offset)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--out", help="Write here (default: standard output).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Write the selected rows as JSON Lines with the chain's head and the hashes that
    prove them, for `audit verify --file` to check offline. Conditions combine."""
    from cohortflow.audit.export import Selection

    if customer is None and campaign is None and since is None:
        raise Invalid("export: give --customer, --campaign or --since", field="customer")
    settings = settings_for(data_dir=data_dir)

    async def selection() -> Selection:
        key = (await ready(settings)).resolve(customer) if customer else ""
        return Selection(key, campaign or "", _since(since))

    chosen = run(selection)
    if output is None:
        run(lambda: _write_export(settings.resolved_database_url, chosen, sys.stdout))
        return
    # Written aside and renamed into place: an interrupted export leaves no half file.
    fd, name = tempfile.mkstemp(prefix=".audit-export-", dir=output.parent.resolve())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            rows = run(lambda: _write_export(settings.resolved_database_url, chosen, f))
        os.replace(name, output)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    err.print(f"exported {rows} rows to {output}", markup=False)


async def _write_export(database_url: str, selection: Selection, sink: TextIO) -> int:
    """Write the export to ``sink``; the number of rows in full."""
    from cohortflow.audit.export import write_export
    from cohortflow.storage.db import Database

    db = Database(database_url)
    try:
        async with db.read_transaction() as session:
            return (await write_export(session, selection, sink.write)).rows
    finally:
        await db.dispose()


async def _trail(settings: Settings, customer: str) -> tuple[str, Any, Any]:
    """One customer's key, audit rows and cohort transitions, in their own order; exit 2
    for a customer never seen."""
    from cohortflow.errors import NotFound
    from cohortflow.storage import cohorts
    from cohortflow.storage.audit import audit_for_customer
    from cohortflow.storage.customers import get_customer
    from cohortflow.storage.db import Database

    key = (await ready(settings)).resolve(customer)
    db = Database(settings.resolved_database_url)
    try:
        async with db.read_transaction() as session:
            rows = await audit_for_customer(session, key)
            if not rows and await get_customer(session, key) is None:
                raise NotFound(f"customer: no customer {customer!r}", field="customer")
            return key, rows, await cohorts.history(session, key)
    finally:
        await db.dispose()


CustomerArg = Annotated[str, typer.Argument(help="Customer key (c_…) or source customer id.")]


@audit_app.command("show")
def audit_show(
    customer: Annotated[
        str, typer.Option("--customer", help="Customer key (c_…) or source customer id.")
    ],
    data_dir: DataDir = None,
) -> None:
    """Print one customer's decisions, oldest first; exit 2 for a customer never seen."""
    settings = settings_for(data_dir=data_dir)
    key, rows, _ = run(lambda: _trail(settings, customer))
    table = Table(title=f"Audit trail of {key}")
    for column in ("seq", "time", "workflow", "step", "kind", "payload"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r.seq), r.created_at, r.workflow_id, r.step_id, r.kind, r.payload)
    out.print(table)
    if not rows:
        err.print(f"no audit rows for customer {customer!r}")


@audit_app.command("why")
def audit_why(
    customer: CustomerArg,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """One customer's story in order, in words: cohorts entered and left, scores and what
    weighed most, branches, approvals and who gave them, CRM writes, consent, the end."""
    from cohortflow.audit.story import story as story_of

    settings = settings_for(data_dir=data_dir)
    key, rows, transitions = run(lambda: _trail(settings, customer))
    story = story_of(rows, transitions)
    if as_json:
        for c in story:
            print_line(json.dumps({"at": c.at, "campaign": c.campaign, "text": c.text}))
        return
    print_line(f"{key}:")
    for c in story:
        print_line(f"  {c.line()}")
    if not story:
        err.print(f"nothing on record for customer {customer!r}")
