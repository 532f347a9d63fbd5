"""Reading events from a stream into the ingestion path: at least once, acknowledged only
after the database commit, idempotent by message id, rejects to a dead-letter destination.

A source is anything that hands out messages in order and takes them back unacknowledged
(:class:`EventSource`); NATS JetStream is the first (``events.nats_source``). Each message
holds one Segment-shaped event or a ``{"batch": [...]}``. A consumer killed mid-batch leaves
its messages unacknowledged, so the stream delivers them again, and the store keeps each
``messageId`` once: nothing is lost and nothing is applied twice. Dead letters are
published after the commit and before the acks, so a consumer that dies between the two
publishes a refused event's dead letter again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from cohortflow.events.ingest import Ingestor, IngestOutcome

log = structlog.get_logger(__name__)

REDELIVER_AFTER_SECONDS = 5.0  # a batch whose commit failed is offered again after this
MAX_DEAD_TEXT = 64 * 1024  # of a message that is not JSON, what its dead letter keeps


class StreamMessage(Protocol):
    """One message of a stream."""

    @property
    def data(self) -> bytes:
        """The message's bytes."""

    async def ack(self) -> None:
        """Done with: never deliver it again."""

    async def nak(self, delay: float) -> None:
        """Not done: deliver it again after ``delay`` seconds."""


@dataclass(frozen=True)
class Lag:
    """How far the consumer is behind: messages not yet delivered, delivered but not yet
    acknowledged, and dead letters so far."""

    pending: int
    unacknowledged: int
    dead_letters: int


class EventSource(Protocol):
    """Where events come from, and where the ones that fail validation go."""

    async def fetch(self, max_messages: int, wait: float) -> Sequence[StreamMessage]:
        """Up to ``max_messages`` messages, waiting at most ``wait`` s for the first."""

    async def dead_letter(self, document: dict[str, Any]) -> None:
        """Keep a refused event with its errors (durably, before its message is acked)."""

    async def confirm(self) -> None:
        """Return once the acknowledgements sent so far have reached the source."""

    async def lag(self) -> Lag:
        """How far behind the consumer is."""


@dataclass
class ConsumeStats:
    """What a consumer did since it started."""

    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    batches: int = 0
    signalled: int = 0


class StreamConsumer:
    """Moves events from ``source`` through ``ingestor``, one fetched batch at a time."""

    def __init__(self, source: EventSource, ingestor: Ingestor, *, batch: int = 100) -> None:
        self._source = source
        self._ingestor = ingestor
        self._batch = batch
        self.stats = ConsumeStats()

    async def run_once(self, wait: float = 1.0) -> int:
        """Fetch, store and acknowledge one batch; how many messages it held."""
        messages = await self._source.fetch(self._batch, wait)
        if not messages:
            return 0
        events: list[Any] = []
        dead: list[dict[str, Any]] = []
        for message in messages:
            try:
                events.extend(_documents(message.data))
            except ValueError as exc:
                text = message.data.decode("utf-8", "replace")[:MAX_DEAD_TEXT]
                error = {"loc": [], "msg": f"malformed JSON: {exc}", "type": "json_invalid"}
                dead.append({"data": text, "errors": [error]})
        try:
            outcome = await self._ingestor.ingest(events, now=datetime.now(UTC))
        except Exception:
            # Nothing committed (one transaction): offer the batch again, later.
            for message in messages:
                await message.nak(REDELIVER_AFTER_SECONDS)
            raise
        # Error paths from the event itself: its place in a fetch means nothing later.
        dead += [
            {"event": events[r.index], "errors": [{**e, "loc": e["loc"][2:]} for e in r.errors]}
            for r in outcome.results
            if r.status == "rejected"
        ]
        for document in dead:
            await self._source.dead_letter(document)
        self.stats.dead_letters += len(dead)
        # Only now, after the commit and the dead letters: a crash before this line makes
        # the stream deliver the batch again, and the store keeps each message id once.
        for message in messages:
            await message.ack()
        await self._source.confirm()
        self._count(len(messages), outcome)
        return len(messages)

    def _count(self, messages: int, outcome: IngestOutcome) -> None:
        self.stats.messages += messages
        self.stats.batches += 1
        self.stats.accepted += outcome.count("accepted")
        self.stats.duplicates += outcome.count("duplicate")
        self.stats.signalled += outcome.signalled


def _documents(data: bytes) -> list[Any]:
    """The events a message holds (ValueError when it is not JSON)."""
    document = json.loads(data)
    if isinstance(document, dict) and isinstance(document.get("batch"), list):
        return list(document["batch"])
    return [document]
