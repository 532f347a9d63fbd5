"""Outbound reservations: the frequency cap's slots held while a CRM write is in flight.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``outbound_reservations`` and its per-customer index."""
    op.create_table(
        "outbound_reservations",
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.Column("reserved_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("workflow_id", "step_id", name="pk_outbound_reservations"),
    )
    op.create_index(
        "ix_outbound_reservations_customer_key_expires_at",
        "outbound_reservations",
        ["customer_key", "expires_at"],
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    op.drop_index("ix_outbound_reservations_customer_key_expires_at", "outbound_reservations")
    op.drop_table("outbound_reservations")
