"""Reads and writes of the ledger tables on a connection it is handed.

The repository never opens or commits a transaction: the unit of work does.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ..api import wire
from ..domain.accounts import AccountView, AssetTotals
from ..domain.entries import Counter, Entry, NewEntry
from ..domain.limits import INT64_MAX
from ..service.ports import DuplicateIdempotencyKey, EntryRows, TotalsOutOfRange
from . import dialect, pg
from .numbering import Numbered, as_utc, number_and_insert_pg, number_and_insert_sqlite
from .schema import account_totals, counters, entries


def totals_of(ledger: str, batch: Sequence[NewEntry]) -> list[tuple[str, str, int, int]]:
    """What `batch` adds to its accounts: (account, asset, debits, credits),
    one per (account, asset), sorted, so that concurrent writers lock account
    rows in the same order and cannot deadlock. Raises TotalsOutOfRange when a
    sum alone passes int64."""
    sums: dict[tuple[str, str], list[int]] = {}
    for e in batch:
        sums.setdefault((e.debit_account, e.asset), [0, 0])[0] += e.amount
        sums.setdefault((e.credit_account, e.asset), [0, 0])[1] += e.amount
    totals = [(account, asset, d, c) for (account, asset), (d, c) in sorted(sums.items())]
    if any(d > INT64_MAX or c > INT64_MAX for _, _, d, c in totals):
        raise TotalsOutOfRange(ledger)
    return totals


def entry_from_row(row: Any) -> Entry:
    created_at = as_utc(row.created_at)
    return Entry(
        sequence=row.sequence,
        created_at=created_at,
        payload_wire=row.wire,
        payload=NewEntry(
            ledger=row.ledger,
            idempotency_key=row.idempotency_key,
            debit_account=row.debit_account,
            credit_account=row.credit_account,
            amount=row.amount,
            asset=row.asset,
            entry_type=row.entry_type,
            description=row.description,
            metadata=dict(row.metadata or {}),
            posted_by=row.posted_by,
        ),
        hash=row.hash or b"",
    )


# Statements built once: constructing and compiling a statement per call cost
# more than the database round trip it makes (profiled).
_COUNTER_VALUE = sa.select(counters.c.value).where(counters.c.ledger == sa.bindparam("ledger"))
_COUNTER = sa.select(counters).where(counters.c.ledger == sa.bindparam("ledger"))

_FIND_BY_KEYS = sa.select(entries).where(
    entries.c.ledger == sa.bindparam("ledger"),
    entries.c.idempotency_key.in_(sa.bindparam("keys", expanding=True)),
)
# Postgres takes the keys as one array: a 1000-key lookup is not a
# 1000-parameter statement.
_FIND_BY_KEYS_PG = sa.select(entries).where(
    entries.c.ledger == sa.bindparam("ledger"),
    entries.c.idempotency_key == sa.any_(sa.bindparam("keys", type_=postgresql.ARRAY(sa.Text))),
)

# SQLite: the guard in WHERE is written as a subtraction so it cannot overflow
# itself; rows it refuses are not updated and not returned. (Postgres adds
# totals inside the numbering statement: numbering.py.)
_sqlite_totals = sqlite.insert(account_totals).values(
    ledger=sa.bindparam("ledger"),
    account=sa.bindparam("account"),
    asset=sa.bindparam("asset"),
    debits=sa.bindparam("debits"),
    credits=sa.bindparam("credits"),
)
_ADD_TOTALS_SQLITE = _sqlite_totals.on_conflict_do_update(
    index_elements=["ledger", "account", "asset"],
    set_={
        "debits": account_totals.c.debits + _sqlite_totals.excluded.debits,
        "credits": account_totals.c.credits + _sqlite_totals.excluded.credits,
    },
    where=sa.and_(
        account_totals.c.debits <= INT64_MAX - _sqlite_totals.excluded.debits,
        account_totals.c.credits <= INT64_MAX - _sqlite_totals.excluded.credits,
    ),
).returning(account_totals.c.account)


def _rows_statement(dialect_name: str) -> sa.Select[Any]:
    # One statement per read, the counter included: one round trip.
    head = (
        sa.select(counters.c.value)
        .where(counters.c.ledger == sa.bindparam("ledger"))
        .scalar_subquery()
    )
    return (
        sa.select(
            entries.c.sequence,
            dialect.epoch_micros(dialect_name, entries.c.created_at),
            entries.c.wire,
            head,
        )
        .where(
            entries.c.ledger == sa.bindparam("ledger"), entries.c.sequence > sa.bindparam("after")
        )
        .order_by(entries.c.sequence)
        .limit(sa.bindparam("limit"))
    )


_ROWS_PG = _rows_statement(dialect.POSTGRES)
_ROWS_SQLITE = _rows_statement(dialect.SQLITE)


class SqlLedgerRepository:
    """service.ports.LedgerRepository on a SQLAlchemy connection (Postgres or SQLite)."""

    def __init__(self, conn: Connection, tx: pg.WriteTransaction | None = None) -> None:
        """Postgres: `tx` is the unit of work's write transaction, for the
        write of entries (pg.py)."""
        self.conn = conn
        self.dialect = dialect.name_of(conn)
        self.tx = tx

    # -- counters ---------------------------------------------------------
    def counter_value(self, ledger: str) -> int | None:
        return self.conn.execute(_COUNTER_VALUE, {"ledger": ledger}).scalar()

    def counter(self, ledger: str) -> Counter | None:
        row = self.conn.execute(_COUNTER, {"ledger": ledger}).one_or_none()
        if row is None:
            return None
        return Counter(
            ledger,
            row.value,
            False,
            row.initialized_by,
            as_utc(row.created_at),
            row.head_hash or b"",
        )

    def create_counter(self, ledger: str, initialized_by: str = "") -> Counter | None:
        """Creates the counter, seeded with the highest existing entry number (0
        if none) and that entry's hash, recording who created it; None when it
        already existed.

        ON CONFLICT DO NOTHING makes concurrent creations safe: exactly one
        inserts, the others (after waiting for it) insert nothing.
        """
        last_hash = (
            sa.select(entries.c.hash)
            .where(entries.c.ledger == ledger)
            .order_by(entries.c.sequence.desc())
            .limit(1)
            .scalar_subquery()
        )
        seed = sa.select(
            sa.literal(ledger, sa.String),
            sa.func.coalesce(sa.func.max(entries.c.sequence), 0),
            dialect.now(self.dialect),
            sa.literal(initialized_by, sa.String),
            last_hash,
        ).where(entries.c.ledger == ledger)
        stmt = (
            dialect.insert(self.dialect, counters)
            .from_select(["ledger", "value", "created_at", "initialized_by", "head_hash"], seed)
            .on_conflict_do_nothing(index_elements=["ledger"])
            .returning(counters.c.value, counters.c.created_at, counters.c.head_hash)
        )
        row = self.conn.execute(stmt).one_or_none()
        if row is None:
            return None
        return Counter(
            ledger, row.value, True, initialized_by, as_utc(row.created_at), row.head_hash or b""
        )

    # -- entries ----------------------------------------------------------
    def find_by_keys(self, ledger: str, keys: Collection[str]) -> dict[str, Entry]:
        """Stored entries of `ledger` with any of `keys`, by key (one query)."""
        statement = _FIND_BY_KEYS_PG if self.dialect == dialect.POSTGRES else _FIND_BY_KEYS
        rows = self.conn.execute(statement, {"ledger": ledger, "keys": list(keys)}).all()
        return {row.idempotency_key: entry_from_row(row) for row in rows}

    def add_entries(self, ledger: str, batch: Sequence[NewEntry]) -> Numbered | None:
        """Adds the entries to their accounts' totals (one row update per
        (account, asset) however many entries touch it, in (account, asset)
        order, so that concurrent writers lock account rows in the same order
        and cannot deadlock), then numbers and stores them (numbering.py).

        None when the ledger has no counter. Raises TotalsOutOfRange when a
        total would pass int64, DuplicateIdempotencyKey when a key is already
        stored; then the transaction must be rolled back.

        Postgres: one statement, committed with it (the unit of work's
        WriteTransaction), all or nothing. SQLite: in the open transaction.
        """
        totals = totals_of(ledger, batch)
        try:
            if self.tx is not None:
                return number_and_insert_pg(self.tx, ledger, batch, totals)
            # SQLite: one row per statement (the write lock is held anyway).
            for account, asset, debit, credit in totals:
                params = {
                    "ledger": ledger,
                    "account": account,
                    "asset": asset,
                    "debits": debit,
                    "credits": credit,
                }
                if self.conn.execute(_ADD_TOTALS_SQLITE, params).first() is None:
                    raise TotalsOutOfRange(ledger)
            return number_and_insert_sqlite(self.conn, ledger, batch)
        except (sa.exc.IntegrityError, psycopg.IntegrityError) as exc:
            if dialect.is_idempotency_key_violation(exc):
                raise DuplicateIdempotencyKey(ledger) from exc
            raise
        except psycopg.errors.NumericValueOutOfRange as exc:
            raise TotalsOutOfRange(ledger) from exc

    def rows_after(self, ledger: str, after_sequence: int, limit: int) -> EntryRows:
        """Up to `limit` entries above `after_sequence`, by keyset on the
        primary key (never OFFSET), plus the counter value read after them
        (so head >= every entry read)."""
        statement = _ROWS_PG if self.dialect == dialect.POSTGRES else _ROWS_SQLITE
        rows = self.conn.execute(
            statement, {"ledger": ledger, "after": after_sequence, "limit": limit}
        ).all()
        missing = [seq for seq, _, payload, _ in rows if payload is None]
        restored = {}
        if missing:  # rows written by other means (restored data): encode from columns
            full = self.conn.execute(
                sa.select(entries).where(
                    entries.c.ledger == ledger, entries.c.sequence.in_(missing)
                )
            ).all()
            restored = {r.sequence: wire.stored_payload(entry_from_row(r)) for r in full}
        read = [
            (seq, micros, payload if payload is not None else restored[seq])
            for seq, micros, payload, _ in rows
        ]
        return EntryRows(read, rows[-1][3] if rows else self.counter_value(ledger))

    # -- accounts ---------------------------------------------------------
    def account_view(self, ledger: str, account: str) -> AccountView | None:
        """Totals and the counter in ONE statement, hence one snapshot: the
        totals include exactly entries 1..as_of_sequence."""
        t = account_totals
        rows = self.conn.execute(
            sa.select(counters.c.value, t.c.asset, t.c.debits, t.c.credits)
            .select_from(
                counters.outerjoin(
                    t, sa.and_(t.c.ledger == counters.c.ledger, t.c.account == account)
                )
            )
            .where(counters.c.ledger == ledger)
            .order_by(t.c.asset)
        ).all()
        if not rows:
            return None
        balances = [
            AssetTotals(asset=r.asset, debits=r.debits, credits=r.credits)
            for r in rows
            if r.asset is not None
        ]
        return AccountView(ledger, account, balances, as_of_sequence=rows[0].value)
