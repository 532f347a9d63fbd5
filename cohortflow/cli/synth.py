"""``cohortflow synth``: a seeded synthetic population for benchmarks and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cohortflow.cli.common import DataDir, err, print_line, ready, run, settings_for

synth_app = typer.Typer(help="Synthetic customers and events (seeded).")


@synth_app.callback(invoke_without_command=True)
def synth(
    customers: Annotated[int, typer.Option(min=1, max=10_000_000, help="Customers.")] = 10_000,
    events: Annotated[int, typer.Option(min=1, max=200_000_000, help="About this many.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Same seed, same population.")] = 0,
    store_events: Annotated[
        bool,
        typer.Option("--events/--no-events", help="Store the event log (features always)."),
    ] = True,
    jsonl: Annotated[
        Path | None, typer.Option(help="Write the events as JSONL here instead of storing.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Generate customers and events; store them with their features in the database, or
    write the events as JSONL for `cohortflow events import` (1M customers / 10M events
    fit in a few GB of memory)."""
    from cohortflow.events.synth import generate, store, write_jsonl

    data = generate(customers, events, seed)
    if jsonl is not None:
        print_line(f"wrote {write_jsonl(data, str(jsonl))} events to {jsonl}")
        return
    settings = settings_for(data_dir=data_dir)

    async def main() -> None:
        from cohortflow.storage.db import Database

        pseudonymiser = await ready(settings)
        db = Database(settings.resolved_database_url)
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
            ) as progress:
                totals = {"customers": customers, "events": data.events, "features": customers}
                tasks = {
                    name: progress.add_task(name, total=total)
                    for name, total in totals.items()
                    if store_events or name != "events"
                }
                await store(
                    db,
                    data,
                    pseudonymiser,
                    with_events=store_events,
                    progress=lambda name, n: progress.advance(tasks[name], n),
                )
        finally:
            await db.dispose()

    run(main)
    stored = f"{data.events} events and " if store_events else ""
    print_line(f"stored {customers} customers, {stored}their features (seed {seed})")
