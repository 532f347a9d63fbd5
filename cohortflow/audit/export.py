"""Writing an audit export from the store (the file's format: ``export_file``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.audit.chain import GENESIS_HASH, RowContent
from cohortflow.audit.export_file import ExportHeader, link_line
from cohortflow.storage._sql import utc
from cohortflow.storage.audit import links_from
from cohortflow.storage.tables import AuditRow


@dataclass(frozen=True)
class Selection:
    """Which rows an export carries in full: all of the given conditions hold."""

    customer_key: str = ""
    campaign_id: str = ""
    since: datetime | None = None

    @property
    def since_text(self) -> str:
        """``since`` as rows store their time (empty when unset)."""
        return "" if self.since is None else utc(self.since).isoformat(timespec="microseconds")

    def describe(self) -> dict[str, str]:
        """The conditions set, for the export's header."""
        named = {
            "customer": self.customer_key,
            "campaign": self.campaign_id,
            "since": self.since_text,
        }
        return {name: value for name, value in named.items() if value}

    def where(self) -> list[ColumnElement[bool]]:
        """The conditions as SQL."""
        conditions: list[ColumnElement[bool]] = []
        if self.customer_key:
            conditions.append(AuditRow.customer_key == self.customer_key)
        if self.campaign_id:
            conditions.append(AuditRow.campaign_id == self.campaign_id)
        if self.since is not None:
            conditions.append(AuditRow.created_at >= self.since_text)
        return conditions

    def matches(self, content: RowContent) -> bool:
        """Whether a row is selected (the same conditions as :meth:`where`)."""
        return (
            (not self.customer_key or content.customer_key == self.customer_key)
            and (not self.campaign_id or content.campaign_id == self.campaign_id)
            and (self.since is None or content.created_at >= self.since_text)
        )


async def write_export(
    session: AsyncSession,
    selection: Selection,
    write: Callable[[str], object],
    now: datetime | None = None,
) -> ExportHeader:
    """Write the export's lines (each ending in a newline) and return its header: the
    header, then every row from the first selected one to the chain's head as it stood when
    the export began. Use one read transaction for the session."""
    head = (
        await session.execute(
            select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
        )
    ).first()
    head_seq, head_hash = (0, GENESIS_HASH) if head is None else (head.seq, head.hash)
    conditions = [*selection.where(), AuditRow.seq <= head_seq]
    first, count = (
        await session.execute(select(func.min(AuditRow.seq), func.count()).where(*conditions))
    ).one()
    first_seq = head_seq + 1 if first is None else int(first)
    header = ExportHeader(
        selection.describe(),
        utc(now).isoformat(),
        first_seq,
        head_seq,
        head_hash,
        int(count),
    )
    write(header.to_line() + "\n")
    if first is None:
        return header
    async for link in links_from(session, first_seq):
        if link.seq > head_seq:
            break
        selected = link.content is not None and selection.matches(link.content)
        write(link_line(link, selected) + "\n")
    return header
