"""Where events come from besides the API: JSONL and CSV files, and the CDNOW log.

Every reader yields ``(line, raw)`` pairs; a line that cannot be parsed yields an error
string instead of an event, so the importer reports it and keeps going.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

Raw = dict[str, Any] | str  # an event document, or why its line could not be read


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def read_jsonl(path: Path) -> Iterator[tuple[int, Raw]]:
    """One event per line; blank lines are skipped."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line, parse_constant=_reject_constant)
            except ValueError as exc:
                yield number, f"malformed JSON: {exc}"
                continue
            yield number, value if isinstance(value, dict) else "not a JSON object"


def _cell(value: str) -> Any:
    """A CSV cell as the number it spells, else the text (CSV has no types)."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def read_csv(path: Path) -> Iterator[tuple[int, Raw]]:
    """A header row, then one event per row.

    Columns ``type, messageId, userId, event, timestamp``; ``properties.NAME`` and
    ``traits.NAME`` columns become those maps (numbers parsed, empty cells left out).
    """
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for number, row in enumerate(reader, start=2):
            event: dict[str, Any] = {}
            for column, value in row.items():
                if column is None or value is None or value == "":
                    continue
                section, dot, name = column.partition(".")
                if dot and section in ("properties", "traits"):
                    event.setdefault(section, {})[name] = _cell(value)
                else:
                    event[column] = value
            yield number, event


def cdnow_events(transactions: pd.DataFrame) -> Iterator[tuple[int, Raw]]:
    """Purchase events from a CDNOW transaction frame (``scoring.cdnow.load_transactions``).

    The message id is the record's position in the log, so importing the log twice (or
    posting it after importing it) stores each purchase once.
    """
    for position, (customer, day, cds, amount) in enumerate(
        transactions[["customer_id", "date", "cds", "amount"]].itertuples(index=False), start=1
    ):
        timestamp = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        yield (
            position,
            {
                "type": "track",
                "messageId": f"cdnow-{position}",
                "userId": str(customer),
                "event": "purchase",
                "timestamp": timestamp.isoformat(),
                "properties": {"amount": float(amount), "quantity": int(cds)},
            },
        )


def read_events(path: Path, fmt: str) -> Iterator[tuple[int, Raw]]:
    """Events of ``path`` in format ``jsonl``, ``csv`` or ``cdnow`` (``auto``: by suffix)."""
    if fmt == "auto":
        name = path.name.lower()
        fmt = "csv" if name.endswith(".csv") else "cdnow" if "cdnow" in name else "jsonl"
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "csv":
        return read_csv(path)
    if fmt == "cdnow":
        from scoring.cdnow import load_transactions

        return cdnow_events(load_transactions(path))
    raise ValueError(f"unknown format {fmt!r}: jsonl, csv, cdnow or auto")
