"""The hash chain: each entry's hash, each counter's head hash, the function
that chains a batch inside the write statement, and hashes for the entries
written before (docs/integrity.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op
from ledger_client.integrity import GENESIS, chain_hash, entry_body

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The chain of one batch (its entries share created_at and have consecutive
# numbers), returned as an array of hashes in order. The header bytes are
# docs/integrity.md's: version 1, sequence, created_at; `bodies` are the
# rest of each entry's canonical bytes, made by the server.
LEDGER_CHAIN = r"""
CREATE OR REPLACE FUNCTION ledger_chain(
    previous BYTEA, first_sequence BIGINT, created_at_micros BIGINT, bodies BYTEA[]
) RETURNS BYTEA[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    h BYTEA := COALESCE(previous, decode(repeat('00', 32), 'hex'));
    stamp BYTEA := int8send(created_at_micros);
    hashes BYTEA[] := array_fill(NULL::BYTEA, ARRAY[cardinality(bodies)]);
BEGIN
    FOR i IN 1..cardinality(bodies) LOOP
        h := sha256(h || '\x01'::BYTEA || int8send(first_sequence + i - 1) || stamp || bodies[i]);
        hashes[i] := h;
    END LOOP;
    RETURN hashes;
END
$$
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PAGE = 5000


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("hash", sa.LargeBinary, nullable=True))
    op.add_column("ledger_counters", sa.Column("head_hash", sa.LargeBinary, nullable=True))
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(LEDGER_CHAIN)
    _chain_existing(conn)
    if conn.dialect.name == "postgresql":
        # A server of an older version still running after this migration
        # (a rolling deploy) would insert entries without a hash and leave
        # the head behind: a break no later write could mend. Its writes
        # fail instead, and are retried on the new servers. NOT VALID: the
        # rows were all just chained, no need to scan them again.
        op.execute(
            "ALTER TABLE ledger_entries ADD CONSTRAINT ck_ledger_entries_hash_present"
            " CHECK (hash IS NOT NULL) NOT VALID"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE ledger_entries DROP CONSTRAINT ck_ledger_entries_hash_present")
        op.execute("DROP FUNCTION IF EXISTS ledger_chain(BYTEA, BIGINT, BIGINT, BYTEA[])")
    # Entries' stored encodings keep their hash field: a reader ignores it.
    op.drop_column("ledger_counters", "head_hash")
    op.drop_column("ledger_entries", "hash")


def _chain_existing(conn: sa.Connection) -> None:
    """Chains every ledger's stored entries in number order, a page at a time,
    and sets each counter's head hash."""
    entries = sa.table(
        "ledger_entries",
        *(
            sa.column(name)
            for name in (
                "ledger",
                "sequence",
                "idempotency_key",
                "debit_account",
                "credit_account",
                "amount",
                "asset",
                "entry_type",
                "description",
                "posted_by",
            )
        ),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("metadata", sa.JSON),
        sa.column("hash", sa.LargeBinary),
        sa.column("wire", sa.LargeBinary),
    )
    counters = sa.table("ledger_counters", sa.column("ledger"), sa.column("head_hash"))
    ledgers = conn.execute(sa.select(entries.c.ledger).distinct()).scalars().all()
    for ledger in ledgers:
        previous = GENESIS
        for page in _pages(conn, entries, ledger):
            updates = []
            for row in page:
                body = entry_body(
                    row.ledger,
                    row.idempotency_key,
                    [(row.debit_account, row.credit_account, row.amount, row.asset)],
                    row.entry_type,
                    row.description,
                    dict(row.metadata or {}),
                    row.posted_by,
                )
                previous = chain_hash(previous, row.sequence, _micros(row.created_at), body)
                wire = None if row.wire is None else row.wire + b"\x6a\x20" + previous
                updates.append({"s": row.sequence, "h": previous, "w": wire})
            conn.execute(
                sa.update(entries)
                .where(entries.c.ledger == ledger, entries.c.sequence == sa.bindparam("s"))
                .values(hash=sa.bindparam("h"), wire=sa.bindparam("w")),
                updates,
            )
        conn.execute(
            sa.update(counters).where(counters.c.ledger == ledger).values(head_hash=previous)
        )


def _pages(conn: sa.Connection, entries: Any, ledger: str) -> Iterator[list[Any]]:
    after = 0
    while True:
        page = conn.execute(
            sa.select(entries)
            .where(entries.c.ledger == ledger, entries.c.sequence > after)
            .order_by(entries.c.sequence)
            .limit(_PAGE)
        ).all()
        if not page:
            return
        yield list(page)
        after = page[-1].sequence


def _micros(value: datetime) -> int:
    if value.tzinfo is None:  # SQLite: naive UTC
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // timedelta(microseconds=1)
