"""What a ledger must refuse and answer: multi-posting entries, reversals,
balance limits, and each account's totals after every entry it took part in
(balances as of a number, and the balances a write returns).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op
from ledger.v1 import ledger_pb2
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_PAGE = 5000

# The chain of one batch, as 0003's ledger_chain, with each entry's canonical
# format version (docs/integrity.md: 2 for a reversal) as one byte of
# `versions`; NULL: all version 1.
LEDGER_CHAIN = r"""
CREATE OR REPLACE FUNCTION ledger_chain(
    previous BYTEA, first_sequence BIGINT, created_at_micros BIGINT, bodies BYTEA[],
    versions BYTEA
) RETURNS BYTEA[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    h BYTEA := COALESCE(previous, decode(repeat('00', 32), 'hex'));
    stamp BYTEA := int8send(created_at_micros);
    hashes BYTEA[] := array_fill(NULL::BYTEA, ARRAY[cardinality(bodies)]);
BEGIN
    IF versions IS NULL THEN
        FOR i IN 1..cardinality(bodies) LOOP
            h := sha256(h || '\x01'::BYTEA || int8send(first_sequence + i - 1) || stamp
                        || bodies[i]);
            hashes[i] := h;
        END LOOP;
    ELSE
        FOR i IN 1..cardinality(bodies) LOOP
            h := sha256(h || substr(versions, i, 1) || int8send(first_sequence + i - 1) || stamp
                        || bodies[i]);
            hashes[i] := h;
        END LOOP;
    END IF;
    RETURN hashes;
END
$$
"""

# 0003's ledger_chain, which servers before this migration call; put back
# by the downgrade.
_OLD_CHAIN_ARGS = "BYTEA, BIGINT, BIGINT, BYTEA[]"
_OLD_CHAIN = r"""
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

# Called by the write statement when a batch would take accounts beyond
# their limits: it raises, so the statement, and so the whole write, is
# rolled back. The detail lists each such account's totals after the batch
# and its limits (storage/numbering.py finds the entry that crossed). It
# never returns; BIGINT lets it stand in for a total.
LEDGER_LIMIT_REFUSED = r"""
CREATE OR REPLACE FUNCTION ledger_limit_refused(refused JSONB) RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_balance_limit',
        MESSAGE = 'balance limit exceeded', DETAIL = refused::TEXT;
END
$$
"""

_HISTORY_BACKFILL = """
    INSERT INTO ledger_account_history (ledger, account, asset, sequence, debits, credits)
    SELECT ledger, account, asset, sequence,
           CAST(sum(d) OVER w AS BIGINT), CAST(sum(c) OVER w AS BIGINT)
    FROM (
        -- One row per (entry, account, asset), also for a restored entry
        -- that debits the account it credits.
        SELECT ledger, account, asset, sequence, sum(d) AS d, sum(c) AS c
        FROM (SELECT ledger, debit_account AS account, asset, sequence, amount AS d, 0 AS c
              FROM ledger_entries
              UNION ALL
              SELECT ledger, credit_account, asset, sequence, 0, amount FROM ledger_entries) AS m
        GROUP BY ledger, account, asset, sequence
    ) AS g
    WINDOW w AS (PARTITION BY ledger, account, asset ORDER BY sequence)
"""


def upgrade() -> None:
    conn = op.get_bind()
    pg = conn.dialect.name == "postgresql"
    op.add_column("ledger_entries", sa.Column("postings", _JSON, nullable=True))
    op.add_column("ledger_entries", sa.Column("reverses_sequence", sa.BigInteger, nullable=True))
    op.add_column("ledger_account_totals", sa.Column("max_net_debit", sa.BigInteger))
    op.add_column("ledger_account_totals", sa.Column("max_net_credit", sa.BigInteger))
    amount_rule = "amount > 0 OR postings IS NOT NULL"
    debit_limit = "max_net_debit IS NULL OR debits - credits <= max_net_debit"
    credit_limit = "max_net_credit IS NULL OR credits - debits <= max_net_credit"
    if pg:
        op.drop_constraint("ck_ledger_entries_amount_positive", "ledger_entries", type_="check")
        # NOT VALID: every existing row has amount > 0 (the old rule).
        op.execute(
            "ALTER TABLE ledger_entries ADD CONSTRAINT ck_ledger_entries_amount_positive"
            f" CHECK ({amount_rule}) NOT VALID"
        )
        # The last guard of the limits (the write statement refuses first,
        # naming the entry); NOT VALID: no row has a limit yet.
        for name, rule in (("max_net_debit", debit_limit), ("max_net_credit", credit_limit)):
            op.execute(
                f"ALTER TABLE ledger_account_totals ADD CONSTRAINT ck_ledger_account_totals_{name}"
                f" CHECK ({rule}) NOT VALID"
            )
        conn.exec_driver_sql(LEDGER_CHAIN)
        conn.exec_driver_sql(LEDGER_LIMIT_REFUSED)
        # A server of an older version still running after this migration
        # would write entries without their history rows and past limits it
        # does not know: without the function its statement calls, its
        # writes fail instead (retried on the new servers), as 0003's check
        # made those of servers older than the chain.
        conn.exec_driver_sql(f"DROP FUNCTION ledger_chain({_OLD_CHAIN_ARGS})")
    else:
        # SQLite cannot alter a constraint: the tables are rebuilt.
        with op.batch_alter_table("ledger_entries", recreate="always") as batch:
            batch.drop_constraint("ck_ledger_entries_amount_positive", type_="check")
            batch.create_check_constraint("ck_ledger_entries_amount_positive", amount_rule)
        with op.batch_alter_table("ledger_account_totals", recreate="always") as batch:
            batch.create_check_constraint("ck_ledger_account_totals_max_net_debit", debit_limit)
            batch.create_check_constraint("ck_ledger_account_totals_max_net_credit", credit_limit)
    # An entry is reversed at most once, whoever races to reverse it
    # (after SQLite's rebuild of the table, which would drop it).
    op.create_index(
        "uq_ledger_entries_reverses",
        "ledger_entries",
        ["ledger", "reverses_sequence"],
        unique=True,
        postgresql_where=sa.text("reverses_sequence IS NOT NULL"),
        sqlite_where=sa.text("reverses_sequence IS NOT NULL"),
    )
    op.create_table(
        "ledger_account_history",
        sa.Column("ledger", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("asset", sa.String(32), primary_key=True),
        sa.Column("sequence", sa.BigInteger, primary_key=True),
        sa.Column("debits", sa.BigInteger, nullable=False),
        sa.Column("credits", sa.BigInteger, nullable=False),
    )
    conn.exec_driver_sql(_HISTORY_BACKFILL)
    _list_postings(conn)


def downgrade() -> None:
    conn = op.get_bind()
    # Entries of several postings, and reversals, cannot be told in the
    # schema before: their postings and the field their hash covers would be
    # lost, and the books would no longer verify.
    kept = conn.exec_driver_sql(
        "SELECT count(*) FROM ledger_entries"
        " WHERE postings IS NOT NULL OR reverses_sequence IS NOT NULL"
    ).scalar()
    if kept:
        raise RuntimeError(
            f"cannot downgrade below 0004: {kept} entries have several postings or reverse"
            " another, which the schema before cannot hold"
        )
    op.drop_table("ledger_account_history")
    op.drop_index("uq_ledger_entries_reverses", "ledger_entries")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_OLD_CHAIN)
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS ledger_limit_refused(JSONB)")
        conn.exec_driver_sql(
            "DROP FUNCTION IF EXISTS ledger_chain(BYTEA, BIGINT, BIGINT, BYTEA[], BYTEA)"
        )
        for name in ("max_net_debit", "max_net_credit"):
            op.drop_constraint(
                f"ck_ledger_account_totals_{name}", "ledger_account_totals", type_="check"
            )
        op.drop_constraint("ck_ledger_entries_amount_positive", "ledger_entries", type_="check")
        op.execute(
            "ALTER TABLE ledger_entries ADD CONSTRAINT ck_ledger_entries_amount_positive"
            " CHECK (amount > 0) NOT VALID"
        )
        op.drop_column("ledger_account_totals", "max_net_credit")
        op.drop_column("ledger_account_totals", "max_net_debit")
        op.drop_column("ledger_entries", "reverses_sequence")
        op.drop_column("ledger_entries", "postings")
        return
    with op.batch_alter_table("ledger_account_totals", recreate="always") as batch:
        batch.drop_constraint("ck_ledger_account_totals_max_net_debit", type_="check")
        batch.drop_constraint("ck_ledger_account_totals_max_net_credit", type_="check")
        batch.drop_column("max_net_credit")
        batch.drop_column("max_net_debit")
    with op.batch_alter_table("ledger_entries", recreate="always") as batch:
        batch.drop_constraint("ck_ledger_entries_amount_positive", type_="check")
        batch.create_check_constraint("ck_ledger_entries_amount_positive", "amount > 0")
        batch.drop_column("reverses_sequence")
        batch.drop_column("postings")


def _list_postings(conn: sa.Connection) -> None:
    """Entry.postings lists every posting, a one-posting entry's too: the
    stored encodings of the entries written before gain theirs."""
    entries = sa.table(
        "ledger_entries",
        *(
            sa.column(name)
            for name in ("ledger", "sequence", "debit_account", "credit_account", "amount", "asset")
        ),
        sa.column("wire", sa.LargeBinary),
    )
    for page in _pages(conn, entries):
        conn.execute(
            sa.update(entries)
            .where(entries.c.ledger == sa.bindparam("l"), entries.c.sequence == sa.bindparam("s"))
            .values(wire=sa.bindparam("w")),
            [
                {
                    "l": row.ledger,
                    "s": row.sequence,
                    "w": row.wire
                    + ledger_pb2.Entry(
                        postings=[
                            ledger_pb2.Posting(
                                debit_account=row.debit_account,
                                credit_account=row.credit_account,
                                amount=row.amount,
                                asset=row.asset,
                            )
                        ]
                    ).SerializeToString(),
                }
                for row in page
            ],
        )


def _pages(conn: sa.Connection, entries: Any) -> Iterator[list[Any]]:
    after: tuple[str, int] = ("", 0)
    while True:
        page = conn.execute(
            sa.select(entries)
            .where(
                entries.c.wire.is_not(None),
                sa.tuple_(entries.c.ledger, entries.c.sequence) > sa.tuple_(*after),
            )
            .order_by(entries.c.ledger, entries.c.sequence)
            .limit(_PAGE)
        ).all()
        if not page:
            return
        yield list(page)
        after = (page[-1].ledger, page[-1].sequence)
