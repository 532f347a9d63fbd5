"""Events, cohorts, their members and transitions, and launch decisions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = sa.String(40)
TS = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the event log, cohort tables and launch decisions."""
    op.create_table(
        "events",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("event", sa.String(128), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_events"),
    )
    op.create_index("ix_events_customer_key_occurred_at", "events", ["customer_key", "occurred_at"])
    op.create_index("ix_events_event_occurred_at", "events", ["event", "occurred_at"])
    op.create_table(
        "cohorts",
        sa.Column("cohort_id", sa.String(64), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("evaluated_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("cohort_id", name="pk_cohorts"),
    )
    op.create_table(
        "cohort_members",
        sa.Column("cohort_id", sa.String(64), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("entered_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("cohort_id", "customer_key", name="pk_cohort_members"),
    )
    op.create_table(
        "cohort_transitions",
        sa.Column("seq", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("cohort_id", sa.String(64), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("evaluation_id", sa.String(40), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_cohort_transitions"),
    )
    op.create_index("ix_cohort_transitions_customer_key", "cohort_transitions", ["customer_key"])
    op.create_index(
        "ix_cohort_transitions_cohort_kind_seq",
        "cohort_transitions",
        ["cohort_id", "kind", "seq"],
    )
    op.create_table(
        "launch_decisions",
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("transition_seq", sa.BigInteger(), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("entry_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("decided_at", TS, nullable=False),
        sa.Column("launched_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("campaign_id", "transition_seq", name="pk_launch_decisions"),
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    for table in ("launch_decisions", "cohort_transitions", "cohort_members", "cohorts"):
        op.drop_table(table)
    op.drop_index("ix_events_event_occurred_at", "events")
    op.drop_index("ix_events_customer_key_occurred_at", "events")
    op.drop_table("events")
