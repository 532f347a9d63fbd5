"""Segment-shaped events: what an event carried beyond the fields we read, and the aliases
that merge an anonymous profile into a known customer.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``events.raw`` and the ``profile_aliases`` table."""
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("raw", sa.JSON(), nullable=True))
    op.create_table(
        "profile_aliases",
        sa.Column("alias_key", sa.String(40), nullable=False),
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("alias_key", name="pk_profile_aliases"),
    )
    op.create_index("ix_profile_aliases_customer_key", "profile_aliases", ["customer_key"])


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    op.drop_index("ix_profile_aliases_customer_key", "profile_aliases")
    op.drop_table("profile_aliases")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("raw")
