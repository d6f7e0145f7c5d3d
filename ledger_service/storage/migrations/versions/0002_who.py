"""Who posted each entry, and who created each counter.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A server default: existing rows read "" (not recorded), and adding the
    # column rewrites nothing on Postgres.
    op.add_column(
        "ledger_entries",
        sa.Column("posted_by", sa.String(64), nullable=False, server_default=""),
    )
    op.add_column(
        "ledger_counters",
        sa.Column("initialized_by", sa.String(64), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_column("ledger_counters", "initialized_by")
    op.drop_column("ledger_entries", "posted_by")
