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
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import wire
from ..domain import Entry, NewEntry
from . import dialect, pg
from .schema import counters, entries

# Postgres: counter bump by n, insert of all n rows (arrays, one round trip)
# and one NOTIFY, in one statement. Row i of the arrays gets number
# old value + i, so a batch's numbers are contiguous and in request order.
# The NOTIFY is delivered at commit, to every server process's listener.
# Driver-level SQL, run on the psycopg connection (storage/pg.py): the arrays
# go as binary parameters (%(...)b) in pg.py's array types, which encode
# several times faster than text arrays or psycopg's generic list dumper.
TAKE_AND_INSERT_PG = f"""
    WITH bump AS (
        UPDATE ledger_counters SET value = value + %(n)s
        WHERE ledger = %(ledger)s
        RETURNING value
    ), ins AS (
        INSERT INTO ledger_entries (
            ledger, sequence, idempotency_key, debit_account, credit_account,
            amount, asset, entry_type, description, metadata, created_at, wire)
        SELECT %(ledger)s, bump.value - %(n)s + t.ord, t.idempotency_key, t.debit_account,
               t.credit_account, t.amount, t.asset, COALESCE(t.entry_type, ''),
               COALESCE(t.description, ''), CAST(COALESCE(NULLIF(t.metadata, ''), '{{}}') AS JSONB),
               clock_timestamp(), t.wire
        FROM bump, unnest(
            %(idempotency_keys)b::TEXT[], %(debit_accounts)b::TEXT[],
            %(credit_accounts)b::TEXT[], %(amounts)b::BIGINT[],
            %(assets)b::TEXT[], %(entry_types)b::TEXT[],
            %(descriptions)b::TEXT[], %(metadatas)b::TEXT[],
            %(wires)b::BYTEA[]
        ) WITH ORDINALITY AS t(idempotency_key, debit_account, credit_account, amount,
                               asset, entry_type, description, metadata, wire, ord)
        RETURNING sequence, created_at
    )
    SELECT ins.sequence, CAST(EXTRACT(EPOCH FROM ins.created_at) * 1000000 AS BIGINT)
    FROM ins CROSS JOIN (
        SELECT pg_notify('{dialect.NOTIFY_CHANNEL}', %(ledger)s || ':' || max(sequence)) FROM ins
    ) AS notified
    ORDER BY ins.sequence
"""


class Numbered:
    """What the database gave a batch: its numbers and timestamps, in batch
    order. `entries()` builds the domain objects from them. Callers do that
    after COMMIT, so that the counter lock is not held while Python works
    (about 3 ms per 1000 entries, plus however long this thread then waits
    for the GIL)."""

    def __init__(
        self,
        batch: Sequence[NewEntry],
        payloads: list[bytes],
        stamps: Sequence[tuple[int, int | datetime]],
    ) -> None:
        self._batch = batch
        self._payloads = payloads
        self._stamps = stamps

    def entries(self) -> list[Entry]:
        return [
            # Postgres hands created_at over as epoch microseconds (cheaper
            # than parsing text), SQLite as a datetime.
            Entry(seq, wire.from_epoch_micros(at) if isinstance(at, int) else at, e, payload)
            for (seq, at), e, payload in zip(self._stamps, self._batch, self._payloads, strict=True)
        ]


def take_next_sequences_and_insert(
    conn: Connection, raw: psycopg.Connection[Any] | None, ledger: str, batch: Sequence[NewEntry]
) -> Numbered | None:
    """Numbers and inserts `batch` (all of `ledger`, keys distinct) with the
    next len(batch) numbers, in order; None when the ledger has no counter.
    On Postgres the statement runs on `raw`, the driver connection under
    `conn` (storage/pg.py).

    Raises an IntegrityError (sqlalchemy's or psycopg's) when an idempotency
    key was taken by a concurrent transaction (the caller rolls back, so no
    number is lost).
    """
    n = len(batch)
    payloads = [wire.payload(e) for e in batch]
    if raw is not None:
        rows = pg.fetch(
            raw,
            TAKE_AND_INSERT_PG,
            {
                "ledger": ledger,
                "n": n,
                "idempotency_keys": pg.TextArray([e.idempotency_key for e in batch]),
                "debit_accounts": pg.TextArray([e.debit_account for e in batch]),
                "credit_accounts": pg.TextArray([e.credit_account for e in batch]),
                "amounts": pg.BigintArray([e.amount for e in batch]),
                "assets": pg.TextArray([e.asset for e in batch]),
                # Optional columns that are empty throughout the batch go as
                # empty arrays (unnest pads them with NULL, COALESCEd above):
                # nothing to encode for the common case.
                "entry_types": _unless_all_empty([e.entry_type for e in batch]),
                "descriptions": _unless_all_empty([e.description for e in batch]),
                "metadatas": _unless_all_empty(
                    [json.dumps(dict(e.metadata)) if e.metadata else "" for e in batch]
                ),
                "wires": pg.ByteaArray(payloads),
            },
        )
        if not rows:
            return None
        return Numbered(batch, payloads, rows)
    else:
        # SQLite holds its database write lock from BEGIN IMMEDIATE to commit,
        # so separate statements are just as serialized; no NOTIFY (streams in
        # this process are woken after commit, other processes poll).
        name = dialect.name_of(conn)
        last = conn.execute(
            sa.update(counters)
            .where(counters.c.ledger == ledger)
            .values(value=counters.c.value + n)
            .returning(counters.c.value)
        ).scalar()
        if last is None:
            return None
        now = as_utc(
            conn.execute(sa.select(sa.type_coerce(dialect.now(name), sa.DateTime()))).scalar_one()
        )
        conn.execute(
            sa.insert(entries),
            [
                {
                    "ledger": ledger,
                    "sequence": last - n + i,
                    "idempotency_key": e.idempotency_key,
                    "debit_account": e.debit_account,
                    "credit_account": e.credit_account,
                    "amount": e.amount,
                    "asset": e.asset,
                    "entry_type": e.entry_type,
                    "description": e.description,
                    "metadata": dict(e.metadata),
                    "created_at": now,
                    "wire": payload,
                }
                for i, (e, payload) in enumerate(zip(batch, payloads, strict=True), start=1)
            ],
        )
        return Numbered(batch, payloads, [(last - n + i, now) for i in range(1, n + 1)])


def _unless_all_empty(values: list[str]) -> pg.TextArray:
    return pg.TextArray(values if any(values) else ())


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; Postgres aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
