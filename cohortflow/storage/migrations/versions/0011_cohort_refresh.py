"""Incremental cohort evaluation: the customers whose events changed since their cohorts
last looked.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``cohort_refresh``."""
    op.create_table(
        "cohort_refresh",
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("customer_key", name="pk_cohort_refresh"),
    )
    op.create_index("ix_cohort_refresh_touched_at", "cohort_refresh", ["touched_at"])


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    op.drop_index("ix_cohort_refresh_touched_at", "cohort_refresh")
    op.drop_table("cohort_refresh")
