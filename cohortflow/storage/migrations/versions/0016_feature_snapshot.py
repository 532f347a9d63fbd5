"""The columnar feature snapshot's registry and the log of features changed since it.

Existing features stay where they are (``customer_features`` remains the operational copy);
with no snapshot registered, the first full cohort evaluation takes one from them.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``feature_changes`` and ``feature_snapshot``."""
    op.create_table(
        "feature_changes",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_feature_changes"),
    )
    op.create_table(
        "feature_snapshot",
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("snapshot_id", sa.String(32), nullable=False),
        sa.Column("customers", sa.BigInteger(), nullable=False),
        sa.Column("columns", sa.JSON(), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("slot", name="pk_feature_snapshot"),
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` added (the snapshot files are left to be overwritten)."""
    op.drop_table("feature_snapshot")
    op.drop_table("feature_changes")
