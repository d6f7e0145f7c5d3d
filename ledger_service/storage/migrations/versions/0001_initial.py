"""Counters, entries and account totals.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JsonMap = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ledger_counters",
        sa.Column("ledger", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("value >= 0", name="ck_ledger_counters_value_nonnegative"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("ledger", sa.String(64), primary_key=True),
        sa.Column("sequence", sa.BigInteger, primary_key=True),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("debit_account", sa.String(128), nullable=False),
        sa.Column("credit_account", sa.String(128), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("asset", sa.String(32), nullable=False),
        sa.Column("entry_type", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("metadata", JsonMap, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wire", sa.LargeBinary, nullable=True),
        sa.UniqueConstraint("ledger", "idempotency_key", name="uq_ledger_entries_idempotency_key"),
        sa.CheckConstraint("sequence > 0", name="ck_ledger_entries_sequence_positive"),
        sa.CheckConstraint("amount > 0", name="ck_ledger_entries_amount_positive"),
    )
    op.create_table(
        "ledger_account_totals",
        sa.Column("ledger", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("asset", sa.String(32), primary_key=True),
        sa.Column("debits", sa.BigInteger, nullable=False),
        sa.Column("credits", sa.BigInteger, nullable=False),
        sa.CheckConstraint("debits >= 0", name="ck_ledger_account_totals_debits_nonnegative"),
        sa.CheckConstraint("credits >= 0", name="ck_ledger_account_totals_credits_nonnegative"),
    )


def downgrade() -> None:
    op.drop_table("ledger_account_totals")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_counters")
