"""The CRM ledger of confirmed effects and the shared request ceiling.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``crm_effects`` and ``crm_requests`` with their indexes."""
    op.create_table(
        "crm_effects",
        sa.Column("idempotency_key", sa.String(300), nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("step_id", sa.String(80), nullable=False),
        sa.Column("customer_key", sa.String(40), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("crm_id", sa.String(100), nullable=False),
        sa.Column("confirmed_at", TS, nullable=False),
        sa.Column("how", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("idempotency_key", name="pk_crm_effects"),
    )
    op.create_index("ix_crm_effects_workflow_id", "crm_effects", ["workflow_id"])
    op.create_table(
        "crm_requests",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("ceiling", sa.String(100), nullable=False),
        sa.Column("sent_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_crm_requests"),
    )
    op.create_index("ix_crm_requests_ceiling_sent_at", "crm_requests", ["ceiling", "sent_at"])


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    op.drop_index("ix_crm_requests_ceiling_sent_at", "crm_requests")
    op.drop_table("crm_requests")
    op.drop_index("ix_crm_effects_workflow_id", "crm_effects")
    op.drop_table("crm_effects")
