"""Initial schema, with the append-only guard on the audit log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = sa.String(40)
TS = sa.DateTime(timezone=True)

PG_GUARD_FUNCTION = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % rejected', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
PG_GUARD_TRIGGERS = (
    "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log"
    " FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log"
    " FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)
SQLITE_GUARD_TRIGGERS = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE rejected'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE rejected'); END",
)


def upgrade() -> None:
    """Create every table, its indexes and the audit log's append-only guard."""
    op.create_table(
        "customers",
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("source_id", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_key", name="pk_customers"),
        sa.UniqueConstraint("source_id", name="uq_customers_source_id"),
    )
    op.create_table(
        "customer_features",
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("as_of", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_key", name="pk_customer_features"),
    )
    op.create_table(
        "consents",
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_key", "channel", "purpose", name="pk_consents"),
    )
    op.create_table(
        "campaigns",
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", name="pk_campaigns"),
    )
    op.create_table(
        "campaign_specs",
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "version", name="pk_campaign_specs"),
    )
    op.create_table(
        "campaign_entries",
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("entry_id", sa.String(64), nullable=False),
        sa.Column("cohort_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("launched_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("workflow_id", name="pk_campaign_entries"),
        sa.UniqueConstraint(
            "campaign_id",
            "customer_key",
            "entry_id",
            name="uq_campaign_entries_campaign_id_customer_key_entry_id",
        ),
    )
    op.create_index("ix_campaign_entries_campaign_id", "campaign_entries", ["campaign_id"])
    op.create_index("ix_campaign_entries_customer_key", "campaign_entries", ["customer_key"])
    op.create_table(
        "approvals",
        sa.Column("approval_id", sa.String(32), nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("approval_id", name="pk_approvals"),
    )
    op.create_index("ix_approvals_workflow_id", "approvals", ["workflow_id"])
    op.create_index("ix_approvals_campaign_id", "approvals", ["campaign_id"])
    op.create_index("ix_approvals_status", "approvals", ["status"])
    op.create_table(
        "segment_assignments",
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("segment", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("crm_synced", sa.Boolean(), nullable=False),
        sa.Column("assigned_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("workflow_id", "step_id", name="pk_segment_assignments"),
    )
    op.create_index("ix_segment_assignments_customer_key", "segment_assignments", ["customer_key"])
    op.create_table(
        "audit_log",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("step_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(48), nullable=False),
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("customer_key", KEY, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
        sa.UniqueConstraint("workflow_id", "step_id", "kind", name="uq_audit_wsk"),
        sa.UniqueConstraint("hash", name="uq_audit_log_hash"),
    )
    op.create_index("ix_audit_log_campaign_id", "audit_log", ["campaign_id"])
    op.create_index("ix_audit_log_customer_key", "audit_log", ["customer_key"])

    if op.get_context().dialect.name == "postgresql":
        op.execute(PG_GUARD_FUNCTION)
        for statement in PG_GUARD_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_GUARD_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    """Drop everything ``upgrade`` created."""
    # Dropping audit_log drops its triggers; the trigger function is a separate object.
    op.drop_table("audit_log")
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION audit_log_append_only()")
    op.drop_table("segment_assignments")
    op.drop_table("approvals")
    op.drop_table("campaign_entries")
    op.drop_table("campaign_specs")
    op.drop_table("campaigns")
    op.drop_table("consents")
    op.drop_table("customer_features")
    op.drop_table("customers")
