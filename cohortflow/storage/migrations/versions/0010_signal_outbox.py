"""The signal outbox: customer-event signals owed to running campaigns, committed with the
events that owe them.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``signal_outbox``."""
    op.create_table(
        "signal_outbox",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("message_id", name="pk_signal_outbox"),
    )
    op.create_index("ix_signal_outbox_due_at", "signal_outbox", ["due_at"])


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    op.drop_index("ix_signal_outbox_due_at", "signal_outbox")
    op.drop_table("signal_outbox")
