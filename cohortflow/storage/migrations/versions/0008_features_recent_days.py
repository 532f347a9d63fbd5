"""The per-day activity that re-windows a customer's windowed features at a later day.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``customer_features.recent`` (rows stored before it have none: see
    ``events.features.features_as_of``; ``cohortflow events recompute`` fills them)."""
    with op.batch_alter_table("customer_features") as batch:
        batch.add_column(sa.Column("recent", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    with op.batch_alter_table("customer_features") as batch:
        batch.drop_column("recent")
