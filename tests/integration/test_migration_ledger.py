"""Migration 0004 on a ledger written before it, on both stores: every entry
gains its history rows (so balances as of any earlier number are exact) and
its listed posting, the books still verify, writes go on, servers of the
version before cannot write any more, and the downgrade undoes it."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2
from ledger_client import integrity

from ledger_service.domain.entries import Posting
from ledger_service.domain.validation import validate_new_entry
from ledger_service.integrity.verify import verify
from ledger_service.service import use_cases
from ledger_service.storage import migrate
from ledger_service.storage.uow import SqlUnitOfWork, create_engine

from ..conftest import throwaway_pg_database
from .helpers import make_entry

# (debit, credit, amount) of the entries written before the migration; the
# last as restored data may hold it, debiting the account it credits.
BEFORE = [
    ("cash", "sales", 5),
    ("cash", "fees", 2),
    ("bank", "cash", 4),
    ("cash", "sales", 1),
    ("cash", "cash", 3),
]


def _write_at_0003(engine: sa.Engine, ledger: str) -> None:
    """Entries as a server of version 0003 stored them: chained, their stored
    encodings without `postings`."""
    migrate.upgrade(engine, "0003")
    previous = integrity.GENESIS
    totals: dict[str, list[int]] = {}
    with engine.begin() as conn:
        for s, (debit, credit, amount) in enumerate(BEFORE, start=1):
            at = datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC)
            micros = int(at.timestamp()) * 1_000_000
            body = integrity.entry_body(
                ledger, f"k{s}", [(debit, credit, amount, "USD")], "", "", {}, ""
            )
            previous = integrity.chain_hash(previous, s, micros, body)
            wire = ledger_pb2.Entry(
                ledger=ledger,
                idempotency_key=f"k{s}",
                debit_account=debit,
                credit_account=credit,
                amount=amount,
                asset="USD",
                hash=previous,
            ).SerializeToString()
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_entries (ledger, sequence, idempotency_key,"
                    " debit_account, credit_account, amount, asset, entry_type, description,"
                    " metadata, created_at, wire, posted_by, hash) VALUES"
                    " (:l, :s, :k, :d, :c, :a, 'USD', '', '', :m, :t, :w, '', :h)"
                ).bindparams(sa.bindparam("m", type_=sa.JSON)),
                {
                    "l": ledger,
                    "s": s,
                    "k": f"k{s}",
                    "d": debit,
                    "c": credit,
                    "a": amount,
                    "m": {},
                    "t": at,
                    "w": wire,
                    "h": previous,
                },
            )
            totals.setdefault(debit, [0, 0])[0] += amount
            totals.setdefault(credit, [0, 0])[1] += amount
        conn.execute(
            sa.text(
                "INSERT INTO ledger_counters (ledger, value, created_at, initialized_by,"
                " head_hash) VALUES (:l, :n, :t, '', :h)"
            ),
            {"l": ledger, "n": len(BEFORE), "t": datetime.now(UTC), "h": previous},
        )
        for account, (d, c) in totals.items():
            conn.execute(
                sa.text("INSERT INTO ledger_account_totals VALUES (:l, :a, 'USD', :d, :c)"),
                {"l": ledger, "a": account, "d": d, "c": c},
            )


def _check(url: str) -> None:
    ledger = f"old-{uuid.uuid4().hex[:8]}"
    engine = create_engine(url, pool_size=4)
    try:
        _write_at_0003(engine, ledger)
        migrate.upgrade(engine)
        uow = functools.partial(SqlUnitOfWork, engine)
        # Balances as of every earlier number, from the backfilled history.
        expected = [(5, 0), (7, 0), (7, 4), (8, 4), (11, 7)]
        for n, totals in enumerate(expected, start=1):
            (cash,) = use_cases.get_account(uow, ledger, "cash", n).balances
            assert (cash.debits, cash.credits) == totals
        stored = use_cases.get_entry(uow, ledger, sequence=2)
        message = ledger_pb2.Entry.FromString(stored.payload_wire or b"")
        assert [(p.debit_account, p.credit_account, p.amount) for p in message.postings] == [
            ("cash", "fees", 2)
        ]
        # A replay of an entry from before reports its totals as of then.
        again = use_cases.post_entry(
            uow,
            make_entry(ledger, "k3", debit_account="bank", credit_account="cash", amount=4),
        )
        assert again.replayed and ("cash", 7, 4) in [
            (b.account, b.debits, b.credits) for b in again.balances
        ]
        assert use_cases.post_entry(uow, make_entry(ledger, "new")).entry.sequence == 6
        assert list(verify(engine, [ledger])) == []
        if engine.dialect.name == "postgresql":
            # The function servers of 0003 chain with is gone: their writes fail.
            with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError):
                conn.exec_driver_sql(
                    "SELECT ledger_chain(NULL::BYTEA, 1::BIGINT, 0::BIGINT, ARRAY[''::BYTEA])"
                )
        migrate.downgrade(engine, "0003")
        with engine.connect() as conn:
            assert "ledger_account_history" not in sa.inspect(conn).get_table_names()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("ledger_entries")}
            assert "postings" not in columns and "reverses_sequence" not in columns
        migrate.upgrade(engine)
        (cash,) = use_cases.get_account(uow, ledger, "cash", 6).balances
        assert (cash.debits, cash.credits) == (111, 7)
        # Entries of several postings cannot go back: the downgrade refuses.
        use_cases.post_entry(
            uow,
            validate_new_entry(
                ledger=ledger,
                idempotency_key="split",
                debit_account="",
                credit_account="",
                amount=0,
                asset="",
                postings=[Posting("cash", "sales", 1, "USD"), Posting("cash", "fees", 1, "USD")],
            ),
        )
        with pytest.raises(RuntimeError, match="cannot downgrade below 0004: 1 entries"):
            migrate.downgrade(engine, "0003")
    finally:
        engine.dispose()


def test_the_migration_gives_older_entries_their_history(db_url: str, tmp_path: Path) -> None:
    if db_url.startswith("sqlite"):
        _check(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    else:
        with throwaway_pg_database("old", migrate_it=False) as url:
            _check(url)
