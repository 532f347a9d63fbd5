"""The signal outbox carries more than customer events: which signal a row owes (consent
changes go through it too), its place among the rows owed in the same transaction, and an
index by customer, whose owed signals are delivered in the order they were owed.

Rows owed before this are customer events, each alone in its place.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``signal_outbox.signal`` and ``seq``, and index ``customer_key``."""
    with op.batch_alter_table("signal_outbox") as batch:
        batch.add_column(
            sa.Column("signal", sa.String(32), server_default="customer_event", nullable=False)
        )
        batch.add_column(sa.Column("seq", sa.Integer(), server_default="0", nullable=False))
    op.create_index("ix_signal_outbox_customer_key", "signal_outbox", ["customer_key"])


def downgrade() -> None:
    """Drop what :func:`upgrade` added. Consent signals still owed are dropped, since the
    code before reads every row as a customer event; their campaigns still meet the change
    at their next CRM write, whose gate reads consent from the store."""
    op.drop_index("ix_signal_outbox_customer_key", "signal_outbox")
    op.execute("DELETE FROM signal_outbox WHERE signal <> 'customer_event'")
    with op.batch_alter_table("signal_outbox") as batch:
        batch.drop_column("seq")
        batch.drop_column("signal")
