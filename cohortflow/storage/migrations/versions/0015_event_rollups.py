"""Retention: the totals of a customer's purged events, which features start from.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``event_rollups``."""
    op.create_table(
        "event_rollups",
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("through", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("customer_key", name="pk_event_rollups"),
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    op.drop_table("event_rollups")
