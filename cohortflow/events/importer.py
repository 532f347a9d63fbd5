"""Import a file of events through the same path as the API, in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cohortflow.events.ingest import Ingestor
from cohortflow.events.sources import Raw


@dataclass
class ImportSummary:
    """What an import did; ``problems`` are ``(line, path, message)``."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    signalled: int = 0
    temporal: str = "skipped"
    problems: list[tuple[int, str, str]] = field(default_factory=list)


async def import_events(
    ingestor: Ingestor,
    events: Iterable[tuple[int, Raw]],
    *,
    batch_size: int = 1_000,
    progress: Callable[[int], None] | None = None,
    max_problems: int = 1_000,
) -> ImportSummary:
    """Ingest ``events`` in batches; unreadable lines and rejected events are reported."""
    summary = ImportSummary()
    lines: list[int] = []
    batch: list[Raw] = []

    async def flush() -> None:
        docs = [doc for doc in batch if isinstance(doc, dict)]
        doc_lines = [line for line, doc in zip(lines, batch, strict=True) if isinstance(doc, dict)]
        for line, doc in zip(lines, batch, strict=True):
            if isinstance(doc, str):
                summary.rejected += 1
                _problem(summary, max_problems, line, "", doc)
        if docs:
            outcome = await ingestor.ingest(docs)
            summary.accepted += outcome.count("accepted")
            summary.duplicates += outcome.count("duplicate")
            summary.rejected += outcome.count("rejected")
            summary.signalled += outcome.signalled
            if outcome.temporal != "skipped":
                summary.temporal = outcome.temporal
            for result in outcome.results:
                for error in result.errors:
                    path = ".".join(str(p) for p in error["loc"][2:])
                    _problem(summary, max_problems, doc_lines[result.index], path, error["msg"])
        if progress is not None:
            progress(len(batch))
        batch.clear()
        lines.clear()

    for line, doc in events:
        lines.append(line)
        batch.append(doc)
        if len(batch) >= batch_size:
            await flush()
    if batch:
        await flush()
    return summary


def _problem(summary: ImportSummary, limit: int, line: int, path: str, message: str) -> None:
    if len(summary.problems) < limit:
        summary.problems.append((line, path, message))
