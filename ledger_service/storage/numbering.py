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
from ..domain.balances import Key, Limits, Movements
from ..domain.chain import GENESIS, HASH_SIZE, body_of, chain_hash, hash_field, version_of
from ..domain.entries import Entry, NewEntry, PostResult, epoch_micros, from_epoch_micros
from . import dialect, pg
from .schema import account_history, counters, entries

# The whole write, one statement (how and why: docs/guarantees.md, sections 1
# to 3 and 6): lock_timeout, then the account totals in (account, asset)
# order, refused whole (ledger_limit_refused, migration 0004) if that would
# take an account beyond a limit at any entry of the batch, then the counter
# row locked, the batch chained from its head hash (ledger_chain), the counter
# bumped, the entries inserted with each account's totals after each entry
# (ledger_account_history), then one NOTIFY. Text columns go joined by U+001F
# (one C call to build), the others as binary arrays. created_at is read
# once the lock is held.
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
            -- Totals beyond a limit after the batch: refused here, with
            -- what storage needs to name the entry, before the table's
            -- check (the last guard) would refuse them without it.
            credits = CASE
                WHEN (ledger_account_totals.max_net_debit IS NOT NULL
                      AND (ledger_account_totals.debits + excluded.debits)
                          - (ledger_account_totals.credits + excluded.credits)
                          > ledger_account_totals.max_net_debit)
                  OR (ledger_account_totals.max_net_credit IS NOT NULL
                      AND (ledger_account_totals.credits + excluded.credits)
                          - (ledger_account_totals.debits + excluded.debits)
                          > ledger_account_totals.max_net_credit)
                THEN ledger_limit_refused(jsonb_build_array(jsonb_build_array(
                    excluded.account, excluded.asset,
                    ledger_account_totals.debits + excluded.debits,
                    ledger_account_totals.credits + excluded.credits,
                    ledger_account_totals.max_net_debit, ledger_account_totals.max_net_credit)))
                ELSE ledger_account_totals.credits + excluded.credits END
        RETURNING account, asset, debits, credits, max_net_debit, max_net_credit
    ), refused AS (
        -- Beyond a limit after some entry of the batch though not after the
        -- batch (swings: what comes after an entry, for the accounts the
        -- batch moves both ways; the others move one way, and the end is
        -- their extreme).
        SELECT ledger_limit_refused(jsonb_agg(jsonb_build_array(
                   t.account, t.asset, t.debits, t.credits, t.max_net_debit, t.max_net_credit)))
               AS refused
        FROM totals AS t
        JOIN unnest(%(swing_accounts)b::TEXT[], %(swing_assets)b::TEXT[],
                    %(swing_low)b::BIGINT[], %(swing_high)b::BIGINT[])
             AS w(account, asset, low, high) ON w.account = t.account AND w.asset = t.asset
        WHERE (t.max_net_debit IS NOT NULL
               AND (t.debits - t.credits)::NUMERIC - w.low > t.max_net_debit)
           OR (t.max_net_credit IS NOT NULL
               AND (t.credits - t.debits)::NUMERIC + w.high > t.max_net_credit)
        HAVING count(*) > 0
    ), head AS (
        SELECT value, head_hash FROM ledger_counters
        WHERE ledger = %(ledger)s::TEXT AND (SELECT count(*) FROM totals) = %(n_totals)s
          AND (SELECT refused FROM refused) IS NULL
        FOR NO KEY UPDATE
    ), chain AS (
        SELECT h.value + %(n)s AS value, h.at, m.micros,
               ledger_chain(h.head_hash, h.value + 1, m.micros, %(bodies)b::BYTEA[],
                            %(versions)s::BYTEA) AS hashes
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
            hash, postings, reverses_sequence)
        SELECT %(ledger)s::TEXT, bump.value - %(n)s + t.ord, t.idempotency_key,
               COALESCE(t.debit_account, ''), COALESCE(t.credit_account, ''), t.amount,
               COALESCE(t.asset, ''), COALESCE(t.entry_type, ''),
               COALESCE(t.description, ''), CAST(COALESCE(NULLIF(t.metadata, ''), '{{}}') AS JSONB),
               bump.at, t.wire || '\\x6a20'::BYTEA || t.hash, COALESCE(t.posted_by, ''), t.hash,
               CAST(NULLIF(t.postings, '') AS JSONB), NULLIF(t.reverses, 0)
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
            bump.hashes,
            string_to_array(%(postings)s::TEXT, chr(31)),
            %(reverses)b::BIGINT[]
        ) WITH ORDINALITY AS t(idempotency_key, debit_account, credit_account, amount,
                               asset, entry_type, description, metadata, wire, posted_by,
                               hash, postings, reverses, ord)
    ), history AS (
        INSERT INTO ledger_account_history (ledger, account, asset, sequence, debits, credits)
        SELECT %(ledger)s::TEXT, h.account, h.asset, bump.value - %(n)s + 1 + h.k,
               t.debits - h.later_debits, t.credits - h.later_credits
        FROM bump, unnest(
            string_to_array(%(history_accounts)s::TEXT, chr(31)),
            string_to_array(%(history_assets)s::TEXT, chr(31)),
            %(history_index)b::BIGINT[], %(history_debits)b::BIGINT[],
            %(history_credits)b::BIGINT[]
        ) AS h(account, asset, k, later_debits, later_credits)
        JOIN totals AS t ON t.account = h.account AND t.asset = h.asset
    )
    SELECT bump.value, bump.micros,
           (SELECT string_agg(h, ''::BYTEA ORDER BY o)
            FROM unnest(bump.hashes) WITH ORDINALITY AS u(h, o)),
           after.accounts, after.assets, after.debits, after.credits
    FROM bump CROSS JOIN (
        SELECT pg_notify('{dialect.NOTIFY_CHANNEL}', %(ledger)s::TEXT || ':' || value) FROM bump
    ) AS notified CROSS JOIN (
        SELECT array_agg(account) AS accounts, array_agg(asset) AS assets,
               array_agg(debits) AS debits, array_agg(credits) AS credits
        FROM totals
    ) AS after
"""


class Numbered:
    """What the database gave a batch: the last of its contiguous numbers, its
    commit time, its hashes (concatenated, in order) and the totals of its
    accounts after it. `entries()` and `results()` build the domain objects
    from them, after COMMIT, so that no lock is held while Python works."""

    def __init__(
        self,
        batch: Sequence[NewEntry],
        payloads: list[bytes],
        last: int,
        at: int | datetime,
        hashes: bytes,
        moves: Movements,
        after: dict[Key, tuple[int, int]],
    ) -> None:
        self._batch = batch
        self._payloads = payloads
        self._last = last
        # Postgres hands created_at over as epoch microseconds (cheaper than
        # parsing text), SQLite as a datetime.
        self._at = from_epoch_micros(at) if isinstance(at, int) else at
        self._hashes = hashes
        self._moves = moves
        self._after = after

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

    def results(self) -> list[PostResult]:
        """Each entry, new, with its accounts' totals right after it."""
        return list(
            map(
                PostResult,
                self.entries(),
                repeat(False),
                self._moves.balances(self._after),
            )
        )


def _after_of(
    accounts: list[str], assets: list[str], debits: list[int], credits: list[int]
) -> dict[Key, tuple[int, int]]:
    return {(a, s): (d, c) for a, s, d, c in zip(accounts, assets, debits, credits, strict=True)}


def number_and_insert_pg(
    tx: pg.WriteTransaction,
    ledger: str,
    batch: Sequence[NewEntry],
    moves: Movements,
) -> Numbered | None:
    """Adds what `batch` (all of `ledger`, keys distinct) moves to the account
    totals and numbers and inserts it with the next len(batch) numbers, in
    order, committed in the same round trip; None (and nothing written) when
    the ledger has no counter.

    Raises psycopg's UniqueViolation when an idempotency key was taken by a
    concurrent transaction (or the entry reversed), NumericValueOutOfRange
    when a total would pass int64, CheckViolation when a balance limit
    would be crossed (refused_limits() reads it); either way nothing was
    written and no number was taken.
    """
    params, payloads = statement_params(ledger, batch, moves, lock_timeout=tx.lock_timeout)
    rows = tx.commit_with(TAKE_AND_INSERT_PG, params)
    return numbered_from(batch, payloads, moves, rows)


def numbered_from(
    batch: Sequence[NewEntry], payloads: list[bytes], moves: Movements, rows: list[Any]
) -> Numbered | None:
    """TAKE_AND_INSERT_PG's answer as a Numbered; None: nothing written."""
    if not rows:
        return None
    ((last, at, hashes, accounts, assets, debits, credits),) = rows
    return Numbered(
        batch, payloads, last, at, hashes, moves, _after_of(accounts, assets, debits, credits)
    )


def refused_limits(exc: BaseException) -> list[tuple[Key, tuple[int, int], Limits]] | None:
    """From the write statement's refusal (ledger_limit_refused): each
    account beyond a limit, its totals after the batch and its limits. None
    when `exc` is not that refusal."""
    diag = getattr(exc, "diag", None)
    if getattr(diag, "constraint_name", None) != LIMIT_REFUSAL:
        return None
    return [
        ((account, asset), (debits, credits), Limits(max_net_debit, max_net_credit))
        for account, asset, debits, credits, max_net_debit, max_net_credit in json.loads(
            diag.message_detail or "[]"  # type: ignore[union-attr]
        )
    ]


# The constraint name ledger_limit_refused raises with (migration 0004).
LIMIT_REFUSAL = "ledger_balance_limit"


def statement_params(
    ledger: str,
    batch: Sequence[NewEntry],
    moves: Movements,
    *,
    lock_timeout: str = "0",
) -> tuple[dict[str, Any], list[bytes]]:
    """TAKE_AND_INSERT_PG's parameters, and the entries' payload encodings.
    `lock_timeout`: milliseconds any lock wait may take ("0": no limit)."""
    payloads = [wire.payload(e) for e in batch]
    totals = moves.totals
    swings = moves.swings()
    reversal = any(e.reverses_sequence for e in batch)
    return {
        "lock_timeout": lock_timeout,
        "ledger": ledger,
        "n": len(batch),
        "n_totals": len(totals),
        "accounts": pg.TextArray([t[0] for t in totals]),
        "account_assets": pg.TextArray([t[1] for t in totals]),
        "debits": pg.BigintArray([t[2] for t in totals]),
        "credits": pg.BigintArray([t[3] for t in totals]),
        "swing_accounts": pg.TextArray([w[0] for w in swings]),
        "swing_assets": pg.TextArray([w[1] for w in swings]),
        "swing_low": pg.BigintArray([w[2] for w in swings]),
        "swing_high": pg.BigintArray([w[3] for w in swings]),
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
        "postings": _joined([postings_json(e) for e in batch]),
        "reverses": pg.BigintArray([e.reverses_sequence for e in batch] if reversal else ()),
        "bodies": pg.ByteaArray([body_of(e) for e in batch]),
        "versions": bytes(version_of(e) for e in batch) if reversal else None,
        "history_accounts": _joined(moves.accounts),
        "history_assets": _joined(moves.assets),
        "history_index": pg.BigintArray(moves.index),
        "history_debits": pg.BigintArray(moves.later_debits),
        "history_credits": pg.BigintArray(moves.later_credits),
    }, payloads


def postings_json(entry: NewEntry) -> str:
    """The postings column of a multi-posting entry ("" for one posting)."""
    return json.dumps([list(p) for p in entry.postings]) if entry.postings else ""


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
    conn: Connection,
    ledger: str,
    batch: Sequence[NewEntry],
    moves: Movements,
    after: dict[Key, tuple[int, int]],
) -> Numbered | None:
    """Numbers, chains and inserts `batch` in the open transaction, with its
    accounts' totals after each entry (the totals themselves were added
    before: `after`, as the upserts returned them); None when the ledger has
    no counter.

    SQLite holds its database write lock from BEGIN IMMEDIATE to commit, so
    separate statements are just as serialized, and the chain is computed
    here, under that lock; no NOTIFY (streams in this process are woken after
    commit, other processes poll). Raises sqlalchemy's IntegrityError when an
    idempotency key is already stored (or the entry already reversed).
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
        previous = chain_hash(previous, i, micros, body_of(e), version_of(e))
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
                "postings": [list(p) for p in e.postings] if e.postings else None,
                "reverses_sequence": e.reverses_sequence or None,
            }
            for i, (e, payload, entry_hash) in enumerate(
                zip(batch, payloads, hashes, strict=True), start=1
            )
        ],
    )
    conn.execute(sa.update(counters).where(counters.c.ledger == ledger).values(head_hash=previous))
    conn.execute(
        sa.insert(account_history),
        [
            {
                "ledger": ledger,
                "account": account,
                "asset": asset,
                "sequence": last - n + 1 + k,
                "debits": after[(account, asset)][0] - d,
                "credits": after[(account, asset)][1] - c,
            }
            for k, account, asset, d, c in moves.rows()
        ],
    )
    return Numbered(batch, payloads, last, now, b"".join(hashes), moves, after)


def _unless_all_empty(values: list[str]) -> pg.TextArray:
    return pg.TextArray(values if any(values) else ())


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; Postgres aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
