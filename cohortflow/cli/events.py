"""Event commands: import a file of events, recompute every feature from the log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cohortflow.cli.common import DataDir, err, print_line, ready, run, settings_for
from cohortflow.errors import Invalid

events_app = typer.Typer(
    help="Events: import files, recompute features, purge past retention.", no_args_is_help=True
)

Format = Literal["auto", "jsonl", "csv", "cdnow"]


def _count_lines(path: Path, fmt: str) -> int | None:
    # A total for the progress bar; a compressed CDNOW log is counted by the loader instead.
    if fmt == "cdnow" or path.suffix == ".gz":
        return None
    with path.open("rb") as f:
        return sum(1 for _ in f)


@events_app.command("import")
def import_file(
    file: Annotated[Path, typer.Argument(help="JSONL, CSV or a CDNOW log.", exists=True)],
    fmt: Annotated[
        Format, typer.Option("--format", help="jsonl, csv, cdnow, or auto (by file name).")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, max=1000, help="Events per batch.")] = 1000,
    signal: Annotated[
        bool, typer.Option("--signal/--no-signal", help="Tell running campaigns (Temporal).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Import events through the same validation and storage as POST /v1/events.

    Re-importing a file stores nothing twice (message ids). Rejected events are listed on
    stderr with their line and field; the exit code is then 2, the others are kept.
    """
    from cohortflow.events.importer import ImportSummary, import_events
    from cohortflow.events.ingest import Ingestor
    from cohortflow.events.relay import SignalRelay
    from cohortflow.events.signals import TemporalSignaller
    from cohortflow.events.sources import read_events
    from cohortflow.storage.db import Database
    from cohortflow.temporal_client import connect

    settings = settings_for(data_dir=data_dir)
    try:
        events = read_events(file, fmt)
    except ValueError as exc:
        raise Invalid(str(exc), field="format") from exc
    total = _count_lines(file, fmt)

    async def main() -> ImportSummary:
        pseudonymiser = await ready(settings)
        db = Database(settings.resolved_database_url)
        # Signals Temporal cannot take now stay owed; the API's relay delivers them later.
        signaller = TemporalSignaller(lambda: connect(settings, tracing=False))
        relay = SignalRelay(db, signaller) if signal else None
        try:
            with Progress(
                TextColumn("importing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=as_json,
            ) as progress:
                task = progress.add_task("import", total=total)
                return await import_events(
                    Ingestor(db, pseudonymiser, relay),
                    events,
                    batch_size=batch_size,
                    progress=lambda n: progress.advance(task, n),
                )
        finally:
            await db.dispose()

    summary = run(main)
    for line, path, message in summary.problems:
        where = f"line {line}" + (f": {path}" if path else "")
        err.print(f"{where}: {message}", markup=False, highlight=False, soft_wrap=True)
    counts = {
        "accepted": summary.accepted,
        "duplicates": summary.duplicates,
        "rejected": summary.rejected,
        "signalled": summary.signalled,
        "temporal": summary.temporal,
    }
    if as_json:
        print_line(json.dumps(counts))
    else:
        print_line(", ".join(f"{k} {v}" for k, v in counts.items()))
    if summary.rejected:
        raise typer.Exit(2)


@events_app.command("purge")
def purge_events(
    older_than_days: Annotated[
        int | None,
        typer.Option(
            "--older-than-days",
            help="Purge events older than this (default: COHORTFLOW_EVENT_RETENTION_DAYS).",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Purge raw events older than the retention period now (the worker does it hourly);
    their totals are kept, so features stay what the whole log would give."""
    from cohortflow.events.purger import purge
    from cohortflow.settings import MIN_RETENTION_DAYS
    from cohortflow.storage.db import Database

    settings = settings_for(data_dir=data_dir)
    days = older_than_days if older_than_days is not None else settings.event_retention_days
    if days is None:
        raise Invalid(
            "older_than_days: give --older-than-days or set COHORTFLOW_EVENT_RETENTION_DAYS",
            field="older_than_days",
        )
    if days < MIN_RETENTION_DAYS:
        raise Invalid(
            f"older_than_days: {days} is under {MIN_RETENTION_DAYS}, the days every feature"
            " window needs",
            field="older_than_days",
        )

    async def main() -> int:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            return await purge(db, days)
        finally:
            await db.dispose()

    print_line(f"purged {run(main)} events older than {days} days")


@events_app.command("recompute")
def recompute(data_dir: DataDir = None) -> None:
    """Recompute every customer's features from the whole event log."""
    from cohortflow.storage.db import Database
    from cohortflow.storage.feature_store import recompute_all

    settings = settings_for(data_dir=data_dir)

    async def main() -> int:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            return await recompute_all(db)
        finally:
            await db.dispose()

    print_line(f"recomputed features of {run(main)} customers")
