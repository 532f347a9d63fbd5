"""``cohortflow consume``: events from a stream (NATS JetStream) into the store."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from cohortflow.cli.common import (
    DataDir,
    LogFormat,
    print_line,
    ready,
    run,
    settings_for,
    setup_observability,
)
from cohortflow.settings import Settings

if TYPE_CHECKING:
    from cohortflow.events.stream import Lag


def consume(
    data_dir: DataDir = None,
    log_format: LogFormat = None,
    batch: Annotated[int, typer.Option(min=1, max=1000, help="Messages per fetch.")] = 100,
    status: Annotated[
        bool, typer.Option("--status", help="Print the consumer's lag as JSON and exit.")
    ] = False,
) -> None:
    """Read Segment-shaped events from NATS JetStream (COHORTFLOW_NATS_URL, subject
    COHORTFLOW_EVENTS_SUBJECT) into the store, through the same validation as the API.

    At least once: a message is acknowledged only after its events are committed, and each
    messageId is stored once, so a consumer killed mid-batch loses and repeats nothing.
    Events that fail validation go to COHORTFLOW_DEAD_LETTER_SUBJECT with their errors.
    Example: cohortflow consume --batch 200 ; cohortflow consume --status
    """
    settings = settings_for(data_dir=data_dir, log_format=log_format)
    if status:
        print_line(json.dumps(vars(run(lambda: _lag(settings)))))
        return
    setup_observability(settings, "cohortflow-consume")
    run(lambda: _consume(settings, batch))


async def _consume(settings: Settings, batch: int) -> None:
    from cohortflow.runtime.services import run_consumer

    await ready(settings)
    await run_consumer(settings, batch=batch)


async def _lag(settings: Settings) -> Lag:
    from cohortflow.events.nats_source import JetStreamSource

    source = await JetStreamSource.connect(settings)
    try:
        return await source.lag()
    finally:
        await source.close()
