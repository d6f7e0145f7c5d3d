"""The numbering rule: where an entry takes its ledger's next number.

INVARIANT (per ledger): committed entries are numbered 1..N with no gap and no
duplicate, and they become visible in number order.

Why it holds: the number is `value + 1` of the ledger's counter row, taken by an
UPDATE in the same transaction that inserts the entry. The UPDATE locks the row
until that transaction ends, so the next transaction's UPDATE waits and reads
the committed value (Postgres re-reads the row after the lock; SQLite lets one
writer at a time). Hence:
- no duplicate: two transactions never read the same value (and the primary
  key (ledger, sequence) would refuse it anyway);
- no gap: a rollback undoes the increment together with the insert, so the
  number is handed out again;
- commit order == number order: N+1 cannot be taken before N's transaction
  has committed (or rolled back), so a reader that sees N+1 already sees N.

This is the LAST statement before COMMIT: everything that can fail or wait
(validation, idempotency lookup, account totals) runs before it, so the lock
is held only for this one round trip plus the commit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..domain import Entry, NewEntry
from . import dialect
from .schema import counters, entries

# Postgres: counter bump, insert and NOTIFY in one statement, one round trip.
# The NOTIFY is delivered at commit, to every server process's listener.
_TAKE_AND_INSERT_PG = sa.text(
    f"""
    WITH bump AS (
        UPDATE ledger_counters SET value = value + 1
        WHERE ledger = :ledger
        RETURNING value
    ), ins AS (
        INSERT INTO ledger_entries (
            ledger, sequence, idempotency_key, debit_account, credit_account,
            amount, asset, entry_type, description, metadata, created_at)
        SELECT :ledger, bump.value, :idempotency_key, :debit_account, :credit_account,
               :amount, :asset, :entry_type, :description, CAST(:metadata AS JSONB),
               clock_timestamp()
        FROM bump
        RETURNING sequence, created_at
    )
    SELECT ins.sequence, ins.created_at,
           pg_notify('{dialect.NOTIFY_CHANNEL}', :ledger || ':' || ins.sequence)::text AS notified
    FROM ins
    """
)


def take_next_sequence_and_insert(conn: Connection, entry: NewEntry) -> Entry | None:
    """Numbers and inserts `entry`; None when the ledger has no counter.

    Raises sqlalchemy IntegrityError when the idempotency key was taken by a
    concurrent transaction (the caller rolls back, so the number is not lost).
    """
    params = {
        "ledger": entry.ledger,
        "idempotency_key": entry.idempotency_key,
        "debit_account": entry.debit_account,
        "credit_account": entry.credit_account,
        "amount": entry.amount,
        "asset": entry.asset,
        "entry_type": entry.entry_type,
        "description": entry.description,
    }
    name = dialect.name_of(conn)
    if name == dialect.POSTGRES:
        row = conn.execute(
            _TAKE_AND_INSERT_PG, {**params, "metadata": json.dumps(dict(entry.metadata))}
        ).first()
        if row is None:
            return None
        sequence, created_at = row.sequence, row.created_at
    else:
        # SQLite holds its database write lock from BEGIN IMMEDIATE to commit,
        # so the two statements are just as serialized; no NOTIFY (streams in
        # this process are woken after commit, others poll).
        value = conn.execute(
            sa.update(counters)
            .where(counters.c.ledger == entry.ledger)
            .values(value=counters.c.value + 1)
            .returning(counters.c.value)
        ).scalar()
        if value is None:
            return None
        created_at = conn.execute(
            sa.insert(entries)
            .values(
                **params,
                sequence=value,
                metadata=dict(entry.metadata),
                created_at=dialect.now(name),
            )
            .returning(entries.c.created_at)
        ).scalar_one()
        sequence = value
    return Entry(sequence=sequence, created_at=as_utc(created_at), payload=entry)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; Postgres aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
