"""Named consumers: each one's position in a ledger, stored by AckEntries.

Filtered streams need no index of their own: ledger_account_history (0004)
already holds a row per account and asset for every entry that touched it,
keyed (ledger, account, asset, sequence).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_consumers",
        sa.Column("ledger", sa.String(64), primary_key=True),
        sa.Column("consumer", sa.String(64), primary_key=True),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("sequence >= 0", name="ck_ledger_consumers_sequence_nonnegative"),
    )


def downgrade() -> None:
    op.drop_table("ledger_consumers")
