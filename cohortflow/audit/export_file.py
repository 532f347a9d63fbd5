"""The audit export file, and its verification offline with no database.

An export is JSON Lines. Line 1 is the header: what was selected, when, and the chain's
head (seq and hash) at that moment. Every following line is one row of the chain, in seq
order, from the first selected row up to the head: a selected row in full (``row``), any
other with its hashes only, which is evidence enough to recompute the chain over it
without showing what it says. So an export of one customer proves its rows are the
chain's own and that none of them was left out, without carrying anyone else's records.

:func:`verify_export` names the first bad line: altered (a hash no longer matches),
removed or reordered (a seq out of turn, a broken link), or cut from the end (the last line
is not the header's head). Compare the head with an anchor you hold (``--anchor``): the
file alone cannot show a chain rewritten from its start.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cohortflow.audit.chain import GENESIS_HASH, Anchor, Link, RowContent, link_problem

FORMAT = "cohortflow-audit-export"
VERSION = 1


@dataclass(frozen=True)
class ExportHeader:
    """Line 1 of an export. ``rows`` counts the lines in full; ``first_seq`` is the first
    line's seq (``head_seq + 1`` when nothing was selected)."""

    selection: Mapping[str, str]
    exported_at: str
    first_seq: int
    head_seq: int
    head_hash: str
    rows: int

    def to_line(self) -> str:
        """The header as its JSON line."""
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)})


def link_line(link: Link, selected: bool) -> str:
    """One row's line: in full when ``selected``, else its hashes only."""
    data: dict[str, Any] = {
        "seq": link.seq,
        "prev_hash": link.prev_hash,
        "hash": link.hash,
        "content_hash": link.content_hash,
    }
    if selected and link.content is not None:
        data["row"] = asdict(link.content)
    return json.dumps(data, ensure_ascii=False)


@dataclass
class ExportReport:
    """The outcome of :func:`verify_export`. ``rows`` counts the rows in full that were
    recomputed, ``evidence`` the rows known by their hashes, of which ``linked_only`` were
    written before content hashes were kept and could only be linked, not recomputed."""

    ok: bool
    problem: str = ""
    bad_line: int | None = None
    header: ExportHeader | None = None
    rows: int = 0
    evidence: int = 0
    linked_only: int = 0
    anchor_checked: bool = False
    notes: list[str] = field(default_factory=list)


def _header(line: str) -> ExportHeader:
    try:
        data = json.loads(line)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError
        return ExportHeader(
            dict(data["selection"]),
            str(data["exported_at"]),
            int(data["first_seq"]),
            int(data["head_seq"]),
            str(data["head_hash"]),
            int(data["rows"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a {FORMAT} header (version {VERSION})") from exc


def _link(line: str) -> Link:
    try:
        data = json.loads(line)
        row = data.get("row")
        content = None if row is None else RowContent(**{k: str(v) for k, v in row.items()})
        digest = data["content_hash"]
        return Link(
            int(data["seq"]),
            str(data["prev_hash"]),
            str(data["hash"]),
            None if digest is None else str(digest),
            content,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a row of the chain: {exc}") from exc


def verify_export(lines: Iterable[str], anchor: Anchor | None = None) -> ExportReport:
    """Check an export's lines against each other, its header and (optionally) ``anchor``."""
    numbered = enumerate((line for line in lines if line.strip()), start=1)
    first = next(numbered, None)
    if first is None:
        return ExportReport(False, "the file is empty", 1)
    try:
        header = _header(first[1])
    except ValueError as exc:
        return ExportReport(False, str(exc), 1)
    report = ExportReport(True, header=header)
    expected = header.first_seq
    prev: str | None = GENESIS_HASH if expected == 1 else None
    number = 1
    for number, line in numbered:
        try:
            link = _link(line)
        except ValueError as exc:
            return _bad(report, number, str(exc))
        problem = link_problem(link, expected, prev)
        if not problem and anchor is not None and anchor.seq == link.seq:
            report.anchor_checked = True
            if anchor.hash != link.hash:
                problem = f"seq {link.seq} does not match its anchor of {anchor.at}"
        if problem:
            return _bad(report, number, problem)
        _count(report, link)
        prev, expected = link.hash, expected + 1
    return _check_end(report, header, number, expected - 1, prev, anchor)


def _count(report: ExportReport, link: Link) -> None:
    if link.content is not None:
        report.rows += 1
    else:
        report.evidence += 1
        report.linked_only += link.content_hash is None


def _check_end(
    report: ExportReport,
    header: ExportHeader,
    last_line: int,
    last_seq: int,
    last_hash: str | None,
    anchor: Anchor | None,
) -> ExportReport:
    if last_seq != header.head_seq:
        return _bad(
            report,
            last_line + 1,
            f"the file ends at seq {last_seq} but its head is seq {header.head_seq}: "
            "lines were removed from its end",
        )
    if last_seq >= header.first_seq and last_hash != header.head_hash:
        return _bad(report, 1, "the head hash is not the hash of the last line")
    if report.rows != header.rows:
        counts = f"the header counts {header.rows} rows, the file holds {report.rows}"
        return _bad(report, 1, counts)
    if anchor is not None and not report.anchor_checked:
        where = "after" if anchor.seq > header.head_seq else "before"
        report.notes.append(f"the anchor (seq {anchor.seq}) lies {where} the exported span")
    if report.linked_only:
        report.notes.append(
            f"{report.linked_only} rows written before content hashes were kept are linked,"
            " not recomputed"
        )
    return report


def _bad(report: ExportReport, line: int, problem: str) -> ExportReport:
    report.ok, report.bad_line, report.problem = False, line, problem
    return report
