"""Audit rows keep the hash of their content apart, so an export can prove the rows it
leaves out by that hash alone (docs/architecture.md, "The audit trail").

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``audit_log.content_hash`` (null on rows written before it)."""
    op.add_column("audit_log", sa.Column("content_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop what :func:`upgrade` added: in place, since a batch copy of the table would
    lose its append-only triggers on SQLite."""
    op.drop_column("audit_log", "content_hash")
