"""Reads and writes of the ledger tables on a connection it is handed.

The repository never opens or commits a transaction: the unit of work does.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ..api import wire
from ..domain.accounts import AccountView, AssetTotals
from ..domain.balances import Breach, Limits, Movements, SumOutOfRange, refusals
from ..domain.consumers import ConsumerPosition
from ..domain.entries import Balance, Counter, Entry, NewEntry, Posting
from ..domain.limits import INT64_MAX
from ..service.ports import (
    DuplicateIdempotencyKey,
    EntryRows,
    LimitBreached,
    LimitsBroken,
    ReversalTaken,
    StoredRow,
    TotalsOutOfRange,
)
from . import dialect, pg
from .numbering import (
    Numbered,
    as_utc,
    number_and_insert_pg,
    number_and_insert_sqlite,
    refused_limits,
)
from .schema import account_history, account_totals, consumers, counters, entries


def movements_of(ledger: str, batch: Sequence[NewEntry]) -> Movements:
    """What `batch` does to its accounts (domain/balances.py); raises
    TotalsOutOfRange when a sum alone passes int64."""
    try:
        return Movements(batch)
    except SumOutOfRange:
        raise TotalsOutOfRange(ledger) from None


def _first_named(
    moves: Movements, reported: Sequence[tuple[tuple[str, str], tuple[int, int], Limits]]
) -> dict[int, Breach]:
    """The first entry crossing a limit of the accounts the statement named,
    from their totals after the batch."""
    found = []
    for key, (debits, credits), limits in reported:
        added_d, added_c = moves.sums(key)
        breach = moves.first_breach(key, (debits - added_d, credits - added_c), limits)
        if breach is not None:
            found.append(breach)
    first = min(found, key=lambda b: b.index) if found else None
    return {} if first is None else {first.index: first}


def entry_from_row(row: Any) -> Entry:
    postings = row.postings
    return Entry(
        sequence=row.sequence,
        created_at=as_utc(row.created_at),
        payload_wire=row.wire,
        payload=payload_from_row(
            row,
            tuple(Posting(d, c, int(a), s) for d, c, a, s in postings) if postings else (),
        ),
        hash=row.hash or b"",
    )


def payload_from_row(row: Any, postings: tuple[Posting, ...]) -> NewEntry:
    """A stored entry's payload, with its postings as the caller read them."""
    return NewEntry(
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
        postings=postings,
        reverses_sequence=row.reverses_sequence or 0,
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
).returning(account_totals.c.debits, account_totals.c.credits)


def _account_statement(as_of: bool) -> sa.Select[Any]:
    """An account's totals and limits per asset, and the counter, in one
    statement (one snapshot). As of a number: each asset's history row at
    or before it, one index probe per column."""
    t, h = account_totals, account_history
    debits: sa.ColumnElement[Any] = t.c.debits
    credits: sa.ColumnElement[Any] = t.c.credits
    if as_of:

        def at(column: sa.Column[int]) -> sa.ScalarSelect[int]:
            return (
                sa.select(column)
                .where(
                    h.c.ledger == sa.bindparam("ledger"),
                    h.c.account == sa.bindparam("account"),
                    h.c.asset == t.c.asset,
                    h.c.sequence <= sa.bindparam("as_of"),
                )
                .order_by(h.c.sequence.desc())
                .limit(1)
                .scalar_subquery()
            )

        debits, credits = at(h.c.debits), at(h.c.credits)
    return (
        sa.select(
            counters.c.value,
            t.c.asset,
            debits.label("debits"),
            credits.label("credits"),
            t.c.max_net_debit,
            t.c.max_net_credit,
        )
        .select_from(
            counters.outerjoin(
                t, sa.and_(t.c.ledger == counters.c.ledger, t.c.account == sa.bindparam("account"))
            )
        )
        .where(counters.c.ledger == sa.bindparam("ledger"))
        .order_by(t.c.asset)
    )


_ACCOUNT_NOW = _account_statement(as_of=False)
_ACCOUNT_AS_OF = _account_statement(as_of=True)


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


def _touching_statement(dialect_name: str) -> sa.Select[Any]:
    """The entries of an account after a number, with the counter: the
    counter row outer-joined to them, so a row comes back (entry columns
    NULL) when none matches, and none without a counter."""
    h, t = account_history, account_totals
    if dialect_name == dialect.POSTGRES:
        # Per asset of the account, its history in number order from the
        # position (an index range each, at most `limit` rows), merged.
        per_asset = (
            sa.select(h.c.sequence)
            .where(
                # The constant, not t.ledger: one shard under Citus (docs/scaling.md).
                h.c.ledger == sa.bindparam("ledger"),
                h.c.account == t.c.account,
                h.c.asset == t.c.asset,
                h.c.sequence > sa.bindparam("after"),
            )
            .order_by(h.c.sequence)
            .limit(sa.bindparam("limit"))
            .lateral("per_asset")
        )
        hits = (
            sa.select(per_asset.c.sequence)
            .select_from(t.join(per_asset, sa.true()))
            .where(t.c.ledger == sa.bindparam("ledger"), t.c.account == sa.bindparam("account"))
        )
    else:
        hits = sa.select(h.c.sequence).where(
            h.c.ledger == sa.bindparam("ledger"),
            h.c.account == sa.bindparam("account"),
            h.c.sequence > sa.bindparam("after"),
        )
    matched = (
        hits.distinct().order_by(sa.text("1")).limit(sa.bindparam("limit")).subquery("matched")
    )
    found = (
        sa.select(
            entries.c.sequence,
            dialect.epoch_micros(dialect_name, entries.c.created_at).label("micros"),
            entries.c.wire,
        )
        .select_from(entries.join(matched, entries.c.sequence == matched.c.sequence))
        .where(entries.c.ledger == sa.bindparam("ledger"))
        .subquery("found")
    )
    return (
        sa.select(found.c.sequence, found.c.micros, found.c.wire, counters.c.value)
        .select_from(counters.outerjoin(found, sa.true()))
        .where(counters.c.ledger == sa.bindparam("ledger"))
        .order_by(found.c.sequence)
    )


_TOUCHING_PG = _touching_statement(dialect.POSTGRES)
_TOUCHING_SQLITE = _touching_statement(dialect.SQLITE)


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
        moves = movements_of(ledger, batch)
        try:
            if self.tx is not None:
                return number_and_insert_pg(self.tx, ledger, batch, moves)
            self._check_limits_sqlite(ledger, batch, moves)
            # SQLite: one row per statement (the write lock is held anyway),
            # each returning the totals it leaves.
            after: dict[tuple[str, str], tuple[int, int]] = {}
            for account, asset, debit, credit in moves.totals:
                params = {
                    "ledger": ledger,
                    "account": account,
                    "asset": asset,
                    "debits": debit,
                    "credits": credit,
                }
                row = self.conn.execute(_ADD_TOTALS_SQLITE, params).first()
                if row is None:
                    raise TotalsOutOfRange(ledger)
                after[(account, asset)] = (row.debits, row.credits)
            return number_and_insert_sqlite(self.conn, ledger, batch, moves, after)
        except (sa.exc.IntegrityError, psycopg.IntegrityError) as exc:
            if dialect.is_idempotency_key_violation(exc):
                raise DuplicateIdempotencyKey(ledger) from exc
            if dialect.is_reversal_violation(exc):
                raise ReversalTaken(ledger) from exc
            reported = refused_limits(exc)
            if reported is not None:
                # The statement names one account; the entries to refuse are
                # found across all of the batch's limited accounts, from
                # their totals now (the statement rolled back). Should a
                # concurrent write have changed them since, the account it
                # named decides.
                refused = self._refusals(ledger, batch, moves) or _first_named(moves, reported)
                raise LimitBreached(refused) from exc
            if dialect.is_limit_violation(exc):  # the last guard: should not happen
                raise LimitBreached({}) from exc
            raise
        except psycopg.errors.NumericValueOutOfRange as exc:
            raise TotalsOutOfRange(ledger) from exc

    def _check_limits_sqlite(
        self, ledger: str, batch: Sequence[NewEntry], moves: Movements
    ) -> None:
        """SQLite: the batch's accounts that have limits, checked entry by
        entry here, under the write lock, before anything is written."""
        refused = self._refusals(ledger, batch, moves)
        if refused:
            raise LimitBreached(refused)

    def _refusals(
        self, ledger: str, batch: Sequence[NewEntry], moves: Movements
    ) -> dict[int, Breach]:
        """The entries of `batch` that the limits of its accounts refuse,
        from their current totals (domain/balances.py refusals)."""
        t = account_totals
        keys = {(a, s) for a, s, _, _ in moves.totals}
        rows = self.conn.execute(
            sa.select(
                t.c.account,
                t.c.asset,
                t.c.debits,
                t.c.credits,
                t.c.max_net_debit,
                t.c.max_net_credit,
            ).where(
                t.c.ledger == ledger,
                t.c.account.in_({a for a, _ in keys}),
                sa.or_(t.c.max_net_debit.is_not(None), t.c.max_net_credit.is_not(None)),
            )
        ).all()
        limited = {
            (r.account, r.asset): (r.debits, r.credits, Limits(r.max_net_debit, r.max_net_credit))
            for r in rows
            if (r.account, r.asset) in keys
        }
        return refusals(batch, limited) if limited else {}

    def rows_after(self, ledger: str, after_sequence: int, limit: int) -> EntryRows:
        """Up to `limit` entries above `after_sequence`, by keyset on the
        primary key (never OFFSET), plus the counter value read after them
        (so head >= every entry read)."""
        statement = _ROWS_PG if self.dialect == dialect.POSTGRES else _ROWS_SQLITE
        rows = self.conn.execute(
            statement, {"ledger": ledger, "after": after_sequence, "limit": limit}
        ).all()
        return EntryRows(
            self._stored(ledger, rows), rows[-1][3] if rows else self.counter_value(ledger)
        )

    def rows_touching(
        self, ledger: str, account: str, after_sequence: int, limit: int
    ) -> EntryRows:
        """Up to `limit` entries above `after_sequence` with a posting of
        `account`, found in its history rows (an index range per asset, not
        a scan of the ledger), and the counter of the same snapshot: with
        fewer than `limit` rows, every match up to the head is among them."""
        statement = _TOUCHING_PG if self.dialect == dialect.POSTGRES else _TOUCHING_SQLITE
        rows = self.conn.execute(
            statement,
            {"ledger": ledger, "account": account, "after": after_sequence, "limit": limit},
        ).all()
        if not rows:
            return EntryRows([], None)
        found = [r for r in rows if r[0] is not None]
        return EntryRows(self._stored(ledger, found), rows[0][3])

    def _stored(self, ledger: str, rows: Sequence[Any]) -> list[StoredRow]:
        """(sequence, micros, stored encoding) of rows of (sequence, micros,
        wire, ...); rows written by other means (restored data, no wire) are
        encoded from their columns."""
        missing = [r[0] for r in rows if r[2] is None]
        restored = {}
        if missing:
            full = self.conn.execute(
                sa.select(entries).where(
                    entries.c.ledger == ledger, entries.c.sequence.in_(missing)
                )
            ).all()
            restored = {r.sequence: wire.stored_payload(entry_from_row(r)) for r in full}
        return [(r[0], r[1], r[2] if r[2] is not None else restored[r[0]]) for r in rows]

    # -- accounts ---------------------------------------------------------
    def account_view(
        self, ledger: str, account: str, as_of_sequence: int = 0
    ) -> AccountView | None:
        """Totals and the counter in ONE statement, hence one snapshot: the
        totals include exactly entries 1..as_of_sequence. As of an earlier
        number, each asset's totals are those of its history row at or
        before it (one index probe per asset)."""
        statement = _ACCOUNT_AS_OF if as_of_sequence else _ACCOUNT_NOW
        rows = self.conn.execute(
            statement, {"ledger": ledger, "account": account, "as_of": as_of_sequence}
        ).all()
        if not rows:
            return None
        head = rows[0].value
        if as_of_sequence > head:
            return AccountView(ledger, account, [], as_of_sequence=head)
        balances = [
            AssetTotals(r.asset, r.debits, r.credits, r.max_net_debit, r.max_net_credit)
            for r in rows
            if r.asset is not None and r.debits is not None
        ]
        return AccountView(ledger, account, balances, as_of_sequence=as_of_sequence or head)

    def set_limits(self, ledger: str, account: str, asset: str, limits: Limits) -> bool:
        """One upsert under the row's lock; the table's checks refuse limits
        the current totals break (so no post can slip in between)."""
        t = account_totals
        values = {
            "max_net_debit": limits.max_net_debit,
            "max_net_credit": limits.max_net_credit,
        }
        seed = sa.select(
            sa.literal(ledger, sa.String),
            sa.literal(account, sa.String),
            sa.literal(asset, sa.String),
            sa.literal(0, sa.BigInteger),
            sa.literal(0, sa.BigInteger),
            sa.literal(limits.max_net_debit, sa.BigInteger),
            sa.literal(limits.max_net_credit, sa.BigInteger),
        ).where(sa.exists().where(counters.c.ledger == ledger))
        insert = dialect.insert(self.dialect, t).from_select(
            ["ledger", "account", "asset", "debits", "credits", "max_net_debit", "max_net_credit"],
            seed,
        )
        stmt = insert.on_conflict_do_update(
            index_elements=["ledger", "account", "asset"], set_=values
        ).returning(t.c.debits)
        try:
            row = self.conn.execute(stmt).first()
        except (sa.exc.IntegrityError, psycopg.IntegrityError) as exc:
            if not dialect.is_limit_violation(exc):
                raise
            if self.dialect != dialect.POSTGRES:
                self.conn.rollback()
            current = self.conn.execute(
                sa.select(t.c.debits, t.c.credits).where(
                    t.c.ledger == ledger, t.c.account == account, t.c.asset == asset
                )
            ).first()
            debits, credits = (0, 0) if current is None else (current.debits, current.credits)
            raise LimitsBroken(debits, credits) from exc
        return row is not None

    def list_accounts(
        self, ledger: str, after_account: str, limit: int
    ) -> tuple[list[tuple[str, list[AssetTotals]]], int] | None:
        t = account_totals
        page = (
            sa.select(t.c.account)
            .where(t.c.ledger == ledger, t.c.account > after_account)
            .group_by(t.c.account)
            .order_by(t.c.account)
            .limit(limit)
            .subquery()
        )
        # The counter, outer-joined to the page's rows: one snapshot, and a
        # row even when the page is empty.
        head = sa.select(counters.c.value.label("head")).where(counters.c.ledger == ledger)
        head_q = head.subquery()
        rows_q = (
            sa.select(t)
            .join(page, page.c.account == t.c.account)
            .where(t.c.ledger == ledger)
            .subquery()
        )
        rows = self.conn.execute(
            sa.select(
                head_q.c.head,
                rows_q.c.account,
                rows_q.c.asset,
                rows_q.c.debits,
                rows_q.c.credits,
                rows_q.c.max_net_debit,
                rows_q.c.max_net_credit,
            )
            .select_from(head_q.outerjoin(rows_q, sa.true()))
            .order_by(rows_q.c.account, rows_q.c.asset)
        ).all()
        if not rows or rows[0].head is None:
            return None
        accounts: list[tuple[str, list[AssetTotals]]] = []
        for r in rows:
            if r.account is None:
                continue
            if not accounts or accounts[-1][0] != r.account:
                accounts.append((r.account, []))
            accounts[-1][1].append(
                AssetTotals(r.asset, r.debits, r.credits, r.max_net_debit, r.max_net_credit)
            )
        return accounts, rows[0].head

    # -- named consumers ----------------------------------------------------
    def store_position(
        self, ledger: str, consumer: str, sequence: int, at: datetime
    ) -> ConsumerPosition:
        """Moves the consumer's position forward to `sequence` (creating it);
        a position already there or further is left as is and returned."""
        c = consumers
        insert = dialect.insert(self.dialect, c).values(
            ledger=ledger, consumer=consumer, sequence=sequence, acked_at=at
        )
        stmt = insert.on_conflict_do_update(
            index_elements=["ledger", "consumer"],
            set_={"sequence": insert.excluded.sequence, "acked_at": insert.excluded.acked_at},
            where=c.c.sequence < insert.excluded.sequence,
        ).returning(c.c.sequence, c.c.acked_at)
        row = self.conn.execute(stmt).first()
        if row is None:  # not moved: it stood there or further
            row = self.conn.execute(
                sa.select(c.c.sequence, c.c.acked_at).where(
                    c.c.ledger == ledger, c.c.consumer == consumer
                )
            ).one()
        return ConsumerPosition(consumer, row.sequence, as_utc(row.acked_at))

    def position(self, ledger: str, consumer: str) -> int | None:
        c = consumers
        return self.conn.execute(
            sa.select(c.c.sequence).where(c.c.ledger == ledger, c.c.consumer == consumer)
        ).scalar()

    def consumers(self, ledger: str) -> tuple[list[ConsumerPosition], int] | None:
        """The ledger's consumers by name and the head of the same snapshot;
        None without a counter."""
        c = consumers
        listed = sa.select(c).where(c.c.ledger == ledger).subquery()
        rows = self.conn.execute(
            sa.select(counters.c.value, listed.c.consumer, listed.c.sequence, listed.c.acked_at)
            .select_from(counters.outerjoin(listed, sa.true()))
            .where(counters.c.ledger == ledger)
            .order_by(listed.c.consumer)
        ).all()
        if not rows:
            return None
        positions = [
            ConsumerPosition(r.consumer, r.sequence, as_utc(r.acked_at))
            for r in rows
            if r.consumer is not None
        ]
        return positions, rows[0].value

    def consumer_lags(self) -> list[tuple[str, str, int]]:
        """(ledger, consumer, head - position) of every consumer."""
        c = consumers
        return [
            (r.ledger, r.consumer, r.lag)
            for r in self.conn.execute(
                sa.select(c.c.ledger, c.c.consumer, (counters.c.value - c.c.sequence).label("lag"))
                .join(counters, counters.c.ledger == c.c.ledger)
                .order_by(c.c.ledger, c.c.consumer)
            )
        ]

    # -- single entries -----------------------------------------------------
    def entry(
        self, ledger: str, sequence: int | None = None, idempotency_key: str | None = None
    ) -> Entry | None:
        where = (
            entries.c.sequence == sequence
            if sequence is not None
            else entries.c.idempotency_key == idempotency_key
        )
        row = self.conn.execute(
            sa.select(entries).where(entries.c.ledger == ledger, where)
        ).one_or_none()
        return None if row is None else entry_from_row(row)

    def reversal_of(self, ledger: str, sequence: int) -> Entry | None:
        row = self.conn.execute(
            sa.select(entries).where(
                entries.c.ledger == ledger, entries.c.reverses_sequence == sequence
            )
        ).one_or_none()
        return None if row is None else entry_from_row(row)

    def balances_at(self, found: Sequence[Entry]) -> list[tuple[Balance, ...]]:
        """Each entry's accounts' totals right after it, from their history
        rows: one statement, an exact index probe per (account, asset,
        number)."""
        if not found:
            return []
        h = account_history
        wanted = {
            (account, p.asset, e.sequence)
            for e in found
            for p in e.payload.all_postings()
            for account in (p.debit_account, p.credit_account)
        }
        rows = self.conn.execute(
            sa.select(h.c.account, h.c.asset, h.c.sequence, h.c.debits, h.c.credits).where(
                h.c.ledger == found[0].payload.ledger,
                sa.tuple_(h.c.account, h.c.asset, h.c.sequence).in_(sorted(wanted)),
            )
        ).all()
        by_number: dict[int, list[Balance]] = {}
        for r in rows:
            by_number.setdefault(r.sequence, []).append(
                Balance(r.account, r.asset, r.debits, r.credits)
            )
        return [tuple(sorted(by_number.get(e.sequence, ()))) for e in found]
