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

Keeping the lock short: everything that can fail or wait comes before the
counter is touched (validation and the idempotency lookup in Python, the
account totals first inside the statement). On Postgres the whole write is ONE
statement that is its own transaction, in one round trip (storage/pg.py), so
the lock is held for the insert and the commit only, never across a round
trip to this process (or its wait for the GIL). That statement writes all of a
batch or nothing: a total that would pass int64 is an error (rolled back), and
without a counter it changes nothing at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..api import wire
from ..domain.chain import GENESIS, HASH_SIZE, body_of, chain_hash, hash_field
from ..domain.entries import Entry, NewEntry, epoch_micros, from_epoch_micros
from . import dialect, pg
from .schema import counters, entries

# The whole write, one statement (how and why: docs/guarantees.md, sections 1
# to 3 and 6): lock_timeout, then the account totals in (account, asset)
# order, then the counter row locked, the batch chained from its head hash
# (ledger_chain, migration 0003), the counter bumped and the entries inserted,
# then one NOTIFY. Text columns go joined by U+001F (one C call to build),
# the others as binary arrays. created_at is read once the lock is held.
TAKE_AND_INSERT_PG = f"""
    WITH deadline AS (
        SELECT set_config('lock_timeout', %(lock_timeout)s::TEXT, true) AS lock_timeout
    ), totals AS (
        INSERT INTO ledger_account_totals (ledger, account, asset, debits, credits)
        SELECT %(ledger)s::TEXT, t.account, t.asset, t.debits, t.credits
        FROM unnest(%(accounts)b::TEXT[], %(account_assets)b::TEXT[],
                    %(debits)b::BIGINT[], %(credits)b::BIGINT[])
             WITH ORDINALITY AS t(account, asset, debits, credits, ord)
        WHERE EXISTS (SELECT 1 FROM ledger_counters WHERE ledger = %(ledger)s::TEXT)
          AND (SELECT lock_timeout FROM deadline) IS NOT NULL
        ORDER BY t.ord
        ON CONFLICT (ledger, account, asset) DO UPDATE
        SET debits = ledger_account_totals.debits + excluded.debits,
            credits = ledger_account_totals.credits + excluded.credits
        RETURNING 1
    ), head AS (
        SELECT value, head_hash FROM ledger_counters
        WHERE ledger = %(ledger)s::TEXT AND (SELECT count(*) FROM totals) = %(n_totals)s
        FOR NO KEY UPDATE
    ), chain AS (
        SELECT h.value + %(n)s AS value, h.at, m.micros,
               ledger_chain(h.head_hash, h.value + 1, m.micros, %(bodies)b::BYTEA[]) AS hashes
        FROM (SELECT value, head_hash, clock_timestamp() AS at FROM head OFFSET 0) AS h,
             LATERAL (SELECT CAST(EXTRACT(EPOCH FROM h.at) * 1000000 AS BIGINT) AS micros) AS m
    ), bump AS (
        UPDATE ledger_counters SET value = chain.value, head_hash = chain.hashes[%(n)s]
        FROM chain WHERE ledger = %(ledger)s::TEXT
        RETURNING chain.value, chain.at, chain.micros, chain.hashes
    ), ins AS (
        INSERT INTO ledger_entries (
            ledger, sequence, idempotency_key, debit_account, credit_account,
            amount, asset, entry_type, description, metadata, created_at, wire, posted_by,
            hash)
        SELECT %(ledger)s::TEXT, bump.value - %(n)s + t.ord, t.idempotency_key, t.debit_account,
               t.credit_account, t.amount, t.asset, COALESCE(t.entry_type, ''),
               COALESCE(t.description, ''), CAST(COALESCE(NULLIF(t.metadata, ''), '{{}}') AS JSONB),
               bump.at, t.wire || '\\x6a20'::BYTEA || t.hash, COALESCE(t.posted_by, ''), t.hash
        FROM bump, unnest(
            string_to_array(%(idempotency_keys)s::TEXT, chr(31)),
            string_to_array(%(debit_accounts)s::TEXT, chr(31)),
            string_to_array(%(credit_accounts)s::TEXT, chr(31)),
            %(amounts)b::BIGINT[],
            string_to_array(%(assets)s::TEXT, chr(31)),
            string_to_array(%(entry_types)s::TEXT, chr(31)),
            %(descriptions)b::TEXT[],
            string_to_array(%(metadatas)s::TEXT, chr(31)),
            %(wires)b::BYTEA[],
            string_to_array(%(posted_bys)s::TEXT, chr(31)),
            bump.hashes
        ) WITH ORDINALITY AS t(idempotency_key, debit_account, credit_account, amount,
                               asset, entry_type, description, metadata, wire, posted_by,
                               hash, ord)
    )
    SELECT bump.value, bump.micros,
           (SELECT string_agg(h, ''::BYTEA ORDER BY o)
            FROM unnest(bump.hashes) WITH ORDINALITY AS u(h, o))
    FROM bump CROSS JOIN (
        SELECT pg_notify('{dialect.NOTIFY_CHANNEL}', %(ledger)s::TEXT || ':' || value) FROM bump
    ) AS notified
"""


class Numbered:
    """What the database gave a batch: the last of its contiguous numbers, its
    commit time and its hashes (concatenated, in order). `entries()` builds
    the domain objects from them, after COMMIT, so that no lock is held while
    Python works."""

    def __init__(
        self,
        batch: Sequence[NewEntry],
        payloads: list[bytes],
        last: int,
        at: int | datetime,
        hashes: bytes,
    ) -> None:
        self._batch = batch
        self._payloads = payloads
        self._last = last
        # Postgres hands created_at over as epoch microseconds (cheaper than
        # parsing text), SQLite as a datetime.
        self._at = from_epoch_micros(at) if isinstance(at, int) else at
        self._hashes = hashes

    def entries(self) -> list[Entry]:
        n = len(self._batch)
        first = self._last - n + 1
        hashes = [self._hashes[i : i + HASH_SIZE] for i in range(0, n * HASH_SIZE, HASH_SIZE)]
        return list(
            map(
                Entry,
                range(first, self._last + 1),
                repeat(self._at, n),
                self._batch,
                [p + hash_field(h) for p, h in zip(self._payloads, hashes, strict=True)],
                hashes,
            )
        )


def number_and_insert_pg(
    tx: pg.WriteTransaction,
    ledger: str,
    batch: Sequence[NewEntry],
    totals: Sequence[tuple[str, str, int, int]],
) -> Numbered | None:
    """Adds `totals` ((account, asset, debits, credits), sorted) to the account
    totals and numbers and inserts `batch` (all of `ledger`, keys distinct)
    with the next len(batch) numbers, in order, committed in the same round
    trip; None (and nothing written) when the ledger has no counter.

    Raises psycopg's UniqueViolation when an idempotency key was taken by a
    concurrent transaction, NumericValueOutOfRange when a total would pass
    int64; either way nothing was written and no number was taken.
    """
    params, payloads = statement_params(ledger, batch, totals, lock_timeout=tx.lock_timeout)
    rows = tx.commit_with(TAKE_AND_INSERT_PG, params)
    if not rows:
        return None
    ((last, at, hashes),) = rows
    return Numbered(batch, payloads, last, at, hashes)


def statement_params(
    ledger: str,
    batch: Sequence[NewEntry],
    totals: Sequence[tuple[str, str, int, int]],
    *,
    lock_timeout: str = "0",
) -> tuple[dict[str, Any], list[bytes]]:
    """TAKE_AND_INSERT_PG's parameters, and the entries' payload encodings.
    `lock_timeout`: milliseconds any lock wait may take ("0": no limit)."""
    payloads = [wire.payload(e) for e in batch]
    return {
        "lock_timeout": lock_timeout,
        "ledger": ledger,
        "n": len(batch),
        "n_totals": len(totals),
        "accounts": pg.TextArray([t[0] for t in totals]),
        "account_assets": pg.TextArray([t[1] for t in totals]),
        "debits": pg.BigintArray([t[2] for t in totals]),
        "credits": pg.BigintArray([t[3] for t in totals]),
        "idempotency_keys": _joined([e.idempotency_key for e in batch]),
        "debit_accounts": _joined([e.debit_account for e in batch]),
        "credit_accounts": _joined([e.credit_account for e in batch]),
        "amounts": pg.BigintArray([e.amount for e in batch]),
        "assets": _joined([e.asset for e in batch]),
        # Optional columns that are empty throughout the batch go empty
        # (unnest pads them with NULL, COALESCEd above): nothing to encode for
        # the common case.
        "entry_types": _joined([e.entry_type for e in batch]),
        "descriptions": _unless_all_empty([e.description for e in batch]),
        "metadatas": _joined([json.dumps(dict(e.metadata)) if e.metadata else "" for e in batch]),
        "wires": pg.ByteaArray(payloads),
        "posted_bys": _joined([e.posted_by for e in batch]),
        "bodies": pg.ByteaArray([body_of(e) for e in batch]),
    }, payloads


def _joined(values: list[str]) -> str:
    """Values without control characters, for string_to_array(..., chr(31))."""
    if not any(values):
        return ""
    joined = _SEPARATOR.join(values)
    # Validation keeps the separator out of these fields; should that ever
    # change, fail loudly rather than shift a column.
    if joined.count(_SEPARATOR) != len(values) - 1:
        raise ValueError("a value contains the array separator U+001F")
    return joined


_SEPARATOR = "\x1f"


def number_and_insert_sqlite(
    conn: Connection, ledger: str, batch: Sequence[NewEntry]
) -> Numbered | None:
    """Numbers, chains and inserts `batch` in the open transaction (the totals
    were added before); None when the ledger has no counter.

    SQLite holds its database write lock from BEGIN IMMEDIATE to commit, so
    separate statements are just as serialized, and the chain is computed
    here, under that lock; no NOTIFY (streams in this process are woken after
    commit, other processes poll). Raises sqlalchemy's IntegrityError when an
    idempotency key is already stored.
    """
    n = len(batch)
    payloads = [wire.payload(e) for e in batch]
    counter = conn.execute(
        sa.update(counters)
        .where(counters.c.ledger == ledger)
        .values(value=counters.c.value + n)
        .returning(counters.c.value, counters.c.head_hash)
    ).one_or_none()
    if counter is None:
        return None
    last, previous = counter.value, counter.head_hash or GENESIS
    now = as_utc(
        conn.execute(
            sa.select(sa.type_coerce(dialect.now(dialect.SQLITE), sa.DateTime()))
        ).scalar_one()
    )
    micros = epoch_micros(now)
    hashes = []
    for i, e in enumerate(batch, start=last - n + 1):
        previous = chain_hash(previous, i, micros, body_of(e))
        hashes.append(previous)
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
                "wire": payload + hash_field(entry_hash),
                "posted_by": e.posted_by,
                "hash": entry_hash,
            }
            for i, (e, payload, entry_hash) in enumerate(
                zip(batch, payloads, hashes, strict=True), start=1
            )
        ],
    )
    conn.execute(sa.update(counters).where(counters.c.ledger == ledger).values(head_hash=previous))
    return Numbered(batch, payloads, last, now, b"".join(hashes))


def _unless_all_empty(values: list[str]) -> pg.TextArray:
    return pg.TextArray(values if any(values) else ())


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; Postgres aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
