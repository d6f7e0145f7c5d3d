"""Tables of the ledger, shared by the repository and the Alembic migrations."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

# JSONB on Postgres (compact, indexable); plain JSON text on SQLite.
JsonMap = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# The same, where Python's None is SQL NULL (not JSON 'null').
JsonOrNull = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)

# One row per ledger: `value` is the last number handed out. Updated in the
# same transaction as the entries it numbers (see storage/numbering.py).
counters = sa.Table(
    "ledger_counters",
    metadata,
    sa.Column("ledger", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Who created it: a principal's name, "cli:<user>", or "" (not recorded).
    sa.Column("initialized_by", sa.String(64), nullable=False, server_default=""),
    # The hash of entry `value` (docs/integrity.md); NULL: no entry yet.
    sa.Column("head_hash", sa.LargeBinary, nullable=True),
    sa.CheckConstraint("value >= 0", name="ck_ledger_counters_value_nonnegative"),
)

# No foreign key to counters on purpose: entries restored from elsewhere may
# exist before their ledger's counter (InitializeCounter then seeds from them).
entries = sa.Table(
    "ledger_entries",
    metadata,
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
    # The principal that posted it; "" when auth was off.
    sa.Column("posted_by", sa.String(64), nullable=False, server_default=""),
    # SHA-256 over the previous entry's hash and this one's canonical bytes
    # (docs/integrity.md). Postgres refuses NULL (ck_ledger_entries_hash_present,
    # migration 0003); on SQLite NULL marks a row restored without one.
    sa.Column("hash", sa.LargeBinary, nullable=True),
    # ledger.v1.Entry encoding without sequence and created_at, hash included
    # (api/wire.py); NULL for rows written by other means, encoded when read.
    sa.Column("wire", sa.LargeBinary, nullable=True),
    # A multi-posting entry's postings, [[debit, credit, amount, asset], ...]
    # (its single-pair columns then empty, amount 0); NULL: one posting, the
    # columns above.
    sa.Column("postings", JsonOrNull, nullable=True),
    # The entry this one reverses (ReverseEntry); at most one reversal each.
    sa.Column("reverses_sequence", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("ledger", "idempotency_key", name="uq_ledger_entries_idempotency_key"),
    sa.CheckConstraint("sequence > 0", name="ck_ledger_entries_sequence_positive"),
    sa.CheckConstraint(
        "amount > 0 OR postings IS NOT NULL", name="ck_ledger_entries_amount_positive"
    ),
    sa.Index(
        "uq_ledger_entries_reverses",
        "ledger",
        "reverses_sequence",
        unique=True,
        postgresql_where=sa.text("reverses_sequence IS NOT NULL"),
        sqlite_where=sa.text("reverses_sequence IS NOT NULL"),
    ),
)

# Running totals per (ledger, account, asset), updated in the entry's
# transaction; the guard in the upsert keeps them from overflowing.
account_totals = sa.Table(
    "ledger_account_totals",
    metadata,
    sa.Column("ledger", sa.String(64), primary_key=True),
    sa.Column("account", sa.String(128), primary_key=True),
    sa.Column("asset", sa.String(32), primary_key=True),
    sa.Column("debits", sa.BigInteger, nullable=False),
    sa.Column("credits", sa.BigInteger, nullable=False),
    # Balance limits (SetAccountLimits); NULL: none. The write statement
    # refuses a post that would cross one; the checks are the last guard.
    sa.Column("max_net_debit", sa.BigInteger, nullable=True),
    sa.Column("max_net_credit", sa.BigInteger, nullable=True),
    sa.CheckConstraint("debits >= 0", name="ck_ledger_account_totals_debits_nonnegative"),
    sa.CheckConstraint("credits >= 0", name="ck_ledger_account_totals_credits_nonnegative"),
    sa.CheckConstraint(
        "max_net_debit IS NULL OR debits - credits <= max_net_debit",
        name="ck_ledger_account_totals_max_net_debit",
    ),
    sa.CheckConstraint(
        "max_net_credit IS NULL OR credits - debits <= max_net_credit",
        name="ck_ledger_account_totals_max_net_credit",
    ),
)

# An account's totals in an asset right after each entry that touched it:
# balances as of any number in one index probe, and the balances a replay
# returns. Written by the statement that writes the entries.
account_history = sa.Table(
    "ledger_account_history",
    metadata,
    sa.Column("ledger", sa.String(64), primary_key=True),
    sa.Column("account", sa.String(128), primary_key=True),
    sa.Column("asset", sa.String(32), primary_key=True),
    sa.Column("sequence", sa.BigInteger, primary_key=True),
    sa.Column("debits", sa.BigInteger, nullable=False),
    sa.Column("credits", sa.BigInteger, nullable=False),
)

# A named consumer's position (AckEntries): it has processed every entry of
# the ledger up to `sequence`. Only moves forward.
consumers = sa.Table(
    "ledger_consumers",
    metadata,
    sa.Column("ledger", sa.String(64), primary_key=True),
    sa.Column("consumer", sa.String(64), primary_key=True),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("sequence >= 0", name="ck_ledger_consumers_sequence_nonnegative"),
)
