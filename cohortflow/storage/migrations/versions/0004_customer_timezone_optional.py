"""A customer's time zone may be unknown, so campaigns fall back to their spec's default.

Until now a customer first seen in a track event was stored in "UTC", and quiet hours and
local-time waits used UTC for them instead of the spec's ``default_timezone``. Stored values
stay as they are: a stored "UTC" may have been a real answer.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Allow NULL in ``customers.timezone``."""
    with op.batch_alter_table("customers") as batch:
        batch.alter_column("timezone", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    """Back to NOT NULL, unknown zones becoming "UTC" as before."""
    op.execute("UPDATE customers SET timezone = 'UTC' WHERE timezone IS NULL")
    with op.batch_alter_table("customers") as batch:
        batch.alter_column("timezone", existing_type=sa.String(64), nullable=False)
