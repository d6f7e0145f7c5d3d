"""`ledger-service verify`: the books checked against themselves, read
straight from the database (docs/integrity.md).

Per ledger: the numbers are exactly 1..N (N: the counter's value), every hash
recomputes from the entry's columns and chains to the previous entry's stored
hash, the counter's head hash is entry N's, every account total equals the
sum of its entries, and every account's history (its totals right after each
entry that touched it) equals the running sums of its entries. Entries are
read in keyset pages and the sums compared in the database, so memory stays
bounded whatever the ledger's size. On Postgres the canonical bytes and the
hashes are computed by the database, in the query (a second implementation
of the encoding, held to the same test vectors as the clients'); on SQLite,
here.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..domain.chain import GENESIS, body_of, chain_hash, version_of
from ..domain.entries import Posting, epoch_micros
from ..domain.limits import INT64_MAX
from ..storage import dialect
from ..storage.repository import payload_from_row
from ..storage.schema import counters, entries

PAGE = 50_000
WORKERS = max(1, min(os.cpu_count() or 1, 4))
# History problems named per account and asset; beyond them, only a count
# (one early damage makes every later row of the account differ).
HISTORY_SHOWN = 3

# progress(ledger, entries checked so far, entries to check)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Problem:
    ledger: str
    what: str

    def __str__(self) -> str:
        return f"{self.ledger}: {self.what}"


def _text(column: str) -> str:
    # textsend(): the UTF-8 bytes (the database's encoding and the
    # connection's are both UTF-8), cheaper than convert_to().
    return f"int4send(octet_length({column})) || textsend({column})"


def _int64_pg(value: str) -> str:
    """A JSON number that is an int64 (`value`: a JSONB expression) as
    BIGINT; NULL for anything else (damage), without an error: each test
    runs only once the one before it held."""
    n = f"({value})::NUMERIC"
    return (
        f"CASE WHEN jsonb_typeof({value}) = 'number' THEN"
        f" CASE WHEN {n} BETWEEN -9223372036854775808 AND 9223372036854775807"
        f" AND {n} = trunc({n}) THEN {n}::BIGINT END END"
    )


def _multi_pg(column: str) -> str:
    """Whether an entry has several postings (`column`, its postings, a
    non-empty JSON array). NULL (never true), an empty array or any other
    JSON: the single pair of columns, as _postings_of reads them."""
    return f"(jsonb_typeof({column}) = 'array' AND {column} <> '[]'::JSONB)"


# One posting `p` (a JSONB element of postings) as its canonical bytes: NULL
# unless it is [debit, credit, amount, asset] with strings and an int64.
_POSTING_PG = (
    "CASE WHEN jsonb_typeof(p) = 'array' AND p->4 IS NULL"
    " AND jsonb_typeof(p->0) = 'string' AND jsonb_typeof(p->1) = 'string'"
    " AND jsonb_typeof(p->3) = 'string'"
    f" THEN {_text('p->>0')} || {_text('p->>1')} || int8send({_int64_pg('p->2')})"
    f" || {_text('p->>3')} END"
)

# Field 6, postings. The single pair of columns as one posting, the common
# case, touches no JSONB function. A multi-posting entry's postings in order
# (its single-pair columns must be empty, else it is not what was chained);
# NULL, and so a hash mismatch, when any of them is malformed.
_POSTINGS_PG = f"""CASE
        WHEN postings IS NULL OR NOT {_multi_pg("postings")} THEN
            '\\x00000001'::BYTEA || {_text("debit_account")} || {_text("credit_account")}
            || int8send(amount) || {_text("asset")}
        WHEN debit_account = '' AND credit_account = '' AND amount = 0 AND asset = '' THEN
            (SELECT CASE WHEN count(*) = count(b) THEN
                        int4send(count(*)::INT) || string_agg(b, ''::BYTEA ORDER BY o) END
             FROM (SELECT o, {_POSTING_PG} AS b
                   FROM jsonb_array_elements(postings) WITH ORDINALITY AS x(p, o)) AS y)
        END"""

# Version 2 (docs/integrity.md) for a reversal: its version byte, and its
# reverses_sequence after posted_by. NULL and 0 alike are no reversal, as a
# reader (proto3) and domain.chain.version_of see them.
_REVERSAL_PG = "COALESCE(reverses_sequence, 0) = 0"

# Field 9, metadata, from the entry's metadata and its text (`metadata_text`,
# jsonb's own rendering of it, cheaper to take apart than a JSON path query,
# the dearest part of the encoding): none, or one pair whose key and value
# are strings that jsonb renders without an escape (no backslash in the
# text, so the text between the quotes is the string itself, and the text
# rebuilt from those parts is the text: one pair, both strings), the common
# cases; anything else the JSON path query of all pairs decides, sorted.
_ONE_KEY = "split_part(metadata_text, '\"', 2)"
_ONE_VALUE = "split_part(metadata_text, '\"', 4)"
_METADATA_PG = f"""CASE
        WHEN metadata_text = '{{}}' THEN '\\x00000000'::BYTEA
        WHEN strpos(metadata_text, '\\') = 0
             AND metadata_text = '{{"' || {_ONE_KEY} || '": "' || {_ONE_VALUE} || '"}}' THEN
            '\\x00000001'::BYTEA || {_text(_ONE_KEY)} || {_text(_ONE_VALUE)}
        ELSE (SELECT CASE jsonb_array_length(pairs)
                  WHEN 0 THEN '\\x00000000'::BYTEA
                  WHEN 1 THEN '\\x00000001'::BYTEA || {_text("pairs->0->>'key'")}
                              || {_text("pairs->0->>'value'")}
                  ELSE (SELECT int4send(count(*)::INT) || string_agg(
                            {_text("key")} || {_text("value")}, ''::BYTEA
                            ORDER BY textsend(key))
                        FROM jsonb_each_text(metadata)) END
              FROM jsonb_path_query_array(metadata, '$.keyvalue()') AS pairs)
        END"""

# One page of a ledger's entries, checked: for each entry the number before
# it and whether its stored hash is SHA-256(previous stored hash || canonical
# bytes), the canonical bytes built column by column as docs/integrity.md
# defines them. Only problems come back, and the page's last entry (`last`).
# One pass over the page in its index's order: no sort, no second scan.
_CHECK_PAGE_PG = f"""
    SELECT sequence, hash, previous, chained, last FROM (
        SELECT sequence, hash,
               lag(sequence, 1, %(after)s::BIGINT) OVER w AS previous,
               hash IS NOT DISTINCT FROM sha256(lag(hash, 1, %(previous_hash)s::BYTEA) OVER w
                   || CASE WHEN {_REVERSAL_PG} THEN '\\x01'::BYTEA ELSE '\\x02'::BYTEA END
                   || int8send(sequence)
                   -- Microseconds since the epoch, exactly, without numeric
                   -- arithmetic: whole seconds, then the microseconds within.
                   || int8send(date_part('epoch', date_trunc('second', created_at))::BIGINT
                               * 1000000 + date_part('microseconds', created_at)::BIGINT %% 1000000)
                   -- The WHERE clause fixes the ledger: its bytes are the parameter's.
                   || %(ledger_text)s::BYTEA || {_text("idempotency_key")}
                   || {_POSTINGS_PG}
                   || {_text("entry_type")} || {_text("description")}
                   || {_METADATA_PG}
                   || {_text("posted_by")}
                   || CASE WHEN {_REVERSAL_PG} THEN ''::BYTEA
                           ELSE int8send(reverses_sequence) END) AS chained,
               lead(sequence) OVER w IS NULL AS last
        FROM (
            SELECT sequence, hash, created_at, idempotency_key, debit_account, credit_account,
                   amount, asset, postings, entry_type, description, metadata, posted_by,
                   reverses_sequence, metadata::TEXT AS metadata_text
            FROM ledger_entries
            WHERE ledger = %(ledger)s AND sequence > %(after)s AND sequence <= %(through)s
            ORDER BY sequence
            LIMIT %(limit)s
        ) AS page
        -- (A frame that lag and lead do not use: it lets the window forget the rows behind.)
        WINDOW w AS (ORDER BY sequence ROWS BETWEEN CURRENT ROW AND CURRENT ROW)
    ) AS checked
    WHERE NOT chained OR previous <> sequence - 1 OR last
"""

# What each entry of a ledger moves, one row per posting side: (sequence,
# account, asset, debits, credits). A multi-posting entry's postings, else the
# single pair of columns, as the chain reads them; a malformed posting's
# parts are NULL (the chain names the entry), never an error.
_MOVES_PG = f"""
    SELECT e.sequence, m.account, e.asset, m.debits, m.credits
    FROM ledger_entries AS e,
         LATERAL (VALUES (e.debit_account, e.amount, 0::BIGINT),
                         (e.credit_account, 0::BIGINT, e.amount)) AS m(account, debits, credits)
    WHERE e.ledger = :ledger AND (e.postings IS NULL OR NOT {_multi_pg("e.postings")})
    UNION ALL
    SELECT e.sequence, m.account, x.p->>3, m.debits, m.credits
    FROM ledger_entries AS e, jsonb_array_elements(e.postings) AS x(p),
         LATERAL (SELECT {_int64_pg("x.p->2")} AS amount) AS a,
         LATERAL (VALUES (x.p->>0, a.amount, 0::BIGINT),
                         (x.p->>1, 0::BIGINT, a.amount)) AS m(account, debits, credits)
    WHERE e.ledger = :ledger AND {_multi_pg("e.postings")}
"""

_MULTI_SQLITE = "COALESCE(json_type(e.postings) = 'array' AND json_array_length(e.postings) > 0, 0)"


def _element_sqlite(i: int) -> str:
    return f"CASE WHEN x.type = 'array' THEN json_extract(x.value, '$[{i}]') END"


_AMOUNT_SQLITE = (
    "CASE WHEN x.type = 'array' THEN CASE WHEN json_type(x.value, '$[2]') = 'integer'"
    " THEN json_extract(x.value, '$[2]') END END"
)

_MOVES_SQLITE = f"""
    SELECT e.sequence, e.debit_account AS account, e.asset, e.amount AS debits, 0 AS credits
    FROM ledger_entries AS e WHERE e.ledger = :ledger AND NOT {_MULTI_SQLITE}
    UNION ALL
    SELECT e.sequence, e.credit_account, e.asset, 0, e.amount
    FROM ledger_entries AS e WHERE e.ledger = :ledger AND NOT {_MULTI_SQLITE}
    UNION ALL
    SELECT e.sequence, {_element_sqlite(0)}, {_element_sqlite(3)}, {_AMOUNT_SQLITE}, 0
    FROM ledger_entries AS e, json_each(e.postings) AS x
    WHERE e.ledger = :ledger AND {_MULTI_SQLITE}
    UNION ALL
    SELECT e.sequence, {_element_sqlite(1)}, {_element_sqlite(3)}, 0, {_AMOUNT_SQLITE}
    FROM ledger_entries AS e, json_each(e.postings) AS x
    WHERE e.ledger = :ledger AND {_MULTI_SQLITE}
"""

# Stored totals beside the sums of the entries, both ways round: a total
# without entries, and entries without a total.
_TOTALS = """
    WITH moves (sequence, account, asset, debits, credits) AS ({moves}),
    summed AS (
        SELECT account, asset, sum(debits) AS debits, sum(credits) AS credits
        FROM moves GROUP BY account, asset
    ), stored AS (
        SELECT account, asset, debits, credits FROM ledger_account_totals WHERE ledger = :ledger
    )
    SELECT COALESCE(t.account, s.account) AS account, COALESCE(t.asset, s.asset) AS asset,
           t.debits, t.credits, s.debits, s.credits
    FROM stored AS t FULL JOIN summed AS s ON s.account = t.account AND s.asset = t.asset
    ORDER BY 1, 2
"""

# The bounds of a range that has none, below or above.
_LOWEST, _HIGHEST = -(2**63), 2**63 - 1

# Postgres: whether the history holds, cheaply (no sort, no summing), as a
# screen before _HISTORY, which sorts the entries' moves to name the
# problems (several times the time). Each history row must be touched by its
# entry, its change from the account's row before it (0 before the first)
# exactly what the entry moved on that account and asset; and there must be
# as many rows as (entry, account, asset) the entries touch. Then the rows
# are those the entries touch, one each, and by induction each holds the
# running totals. NULL (a malformed posting) never holds: then _HISTORY
# decides.
#
# For the rows numbered :low..:high only (with the entries so numbered), so
# that a large ledger's history is screened in ranges at once, each right
# after its range of the chain, the change of each account's first row in
# the range taken from its last row before the range (one probe). Ranges
# that together cover every number screen what the whole history's screen
# does: each row against the same row before it, and the counts add up.
#
# `h` below is the history rows of the range with their changes: the two
# ways of reading them follow.
_HISTORY_CHECKED_PG = f"""
    SELECT count(*) FILTER (WHERE NOT COALESCE(holds, FALSE)) = 0 AND count(*) = (
               SELECT COALESCE(sum(CASE
                   WHEN postings IS NULL OR NOT {_multi_pg("postings")} THEN
                       CASE WHEN debit_account = credit_account THEN 1 ELSE 2 END
                   ELSE (SELECT count(*) FROM (
                             SELECT DISTINCT m.account, x.p->>3
                             FROM jsonb_array_elements(postings) AS x(p),
                                  LATERAL (VALUES (x.p->>0), (x.p->>1)) AS m(account)) AS k)
                   END), 0)
               FROM ledger_entries
               WHERE ledger = :ledger AND sequence >= :low AND sequence <= :high)
    FROM (
        SELECT CASE
            WHEN e.sequence IS NULL THEN FALSE
            WHEN e.postings IS NULL OR NOT {_multi_pg("e.postings")} THEN
                -- (An entry debiting the account it credits is left to _HISTORY.)
                h.asset = e.asset AND e.debit_account <> e.credit_account
                AND ((h.account = e.debit_account AND h.debits = e.amount AND h.credits = 0)
                     OR (h.account = e.credit_account AND h.debits = 0 AND h.credits = e.amount))
            ELSE (SELECT count(*) > 0 AND sum(m.debits) = h.debits AND sum(m.credits) = h.credits
                  FROM jsonb_array_elements(e.postings) AS x(p),
                       LATERAL (SELECT {_int64_pg("x.p->2")} AS amount) AS a,
                       LATERAL (VALUES (x.p->>0, a.amount, 0::BIGINT),
                                       (x.p->>1, 0::BIGINT, a.amount))
                           AS m(account, debits, credits)
                  WHERE m.account = h.account AND x.p->>3 = h.asset)
            END AS holds
        FROM h LEFT JOIN {{entries}}
    ) AS checked
"""

# A ledger of few accounts (each with an asset: _MERGED_ACCOUNTS at most),
# named beforehand (:account<i>, :asset<i>): each account's rows in the
# range read by its part of the index, in number order, merged into one
# stream in number order and that merged with the entries in theirs. No
# hash table, no sort: the cheapest way by far. (The planner, misjudging how
# many rows an account has, would look each entry up instead: the settings
# of _MERGED_SETTINGS leave it the merges.)
_MERGED_ACCOUNTS = 64


def _one_account_pg(i: int) -> str:
    def before(side: str) -> str:
        return (
            f"COALESCE((SELECT b.{side} FROM ledger_account_history AS b"
            f" WHERE :low > {_LOWEST} AND b.ledger = :ledger AND b.account = :account{i}"
            f" AND b.asset = :asset{i} AND b.sequence < :low"
            f" ORDER BY b.sequence DESC LIMIT 1), 0::BIGINT)"
        )

    return f"""(
        SELECT account, asset, sequence,
               debits - lag(debits, 1, {before("debits")}) OVER k AS debits,
               credits - lag(credits, 1, {before("credits")}) OVER k AS credits
        FROM ledger_account_history
        WHERE ledger = :ledger AND account = :account{i} AND asset = :asset{i}
          AND sequence >= :low AND sequence <= :high
        WINDOW k AS (ORDER BY sequence ROWS BETWEEN CURRENT ROW AND CURRENT ROW))"""


@functools.cache
def _history_holds_merged_pg(accounts: int) -> str:
    """The screen of a ledger whose history has `accounts` (account, asset)."""
    rows = "\n        UNION ALL ".join(_one_account_pg(i) for i in range(accounts))
    if not accounts:
        rows = "SELECT NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT WHERE false"
    # The entries as a subquery in number order, one row per number (as
    # they are): the planner then sees them unique and in the order merged.
    return f"WITH h (account, asset, sequence, debits, credits) AS ({rows}\n    ORDER BY 3)" + (
        _HISTORY_CHECKED_PG.format(
            entries="""(
            SELECT DISTINCT ON (sequence) sequence, debit_account, credit_account, amount,
                   asset, postings
            FROM ledger_entries
            WHERE ledger = :ledger AND sequence >= :low AND sequence <= :high
            ORDER BY sequence) AS e ON e.sequence = h.sequence"""
        )
    )


# Any ledger: its history in its index's order (the rows outside the range
# left in the index), joined to its entries by a hash.
_HISTORY_HOLDS_PG = f"""
    WITH w AS (
        SELECT account, asset, sequence, debits, credits,
               lag(debits) OVER k AS before_debits, lag(credits) OVER k AS before_credits
        FROM ledger_account_history
        WHERE ledger = :ledger AND sequence >= :low AND sequence <= :high
        WINDOW k AS (PARTITION BY account, asset ORDER BY sequence
                     ROWS BETWEEN CURRENT ROW AND CURRENT ROW)
    ), h AS (
        SELECT account, asset, sequence,
               debits - COALESCE(before_debits, (
                   SELECT b.debits FROM ledger_account_history AS b
                   WHERE :low > {_LOWEST} AND b.ledger = :ledger AND b.account = w.account
                     AND b.asset = w.asset AND b.sequence < :low
                   ORDER BY b.sequence DESC LIMIT 1), 0) AS debits,
               credits - COALESCE(before_credits, (
                   SELECT b.credits FROM ledger_account_history AS b
                   WHERE :low > {_LOWEST} AND b.ledger = :ledger AND b.account = w.account
                     AND b.asset = w.asset AND b.sequence < :low
                   ORDER BY b.sequence DESC LIMIT 1), 0) AS credits
        FROM w
    )""" + _HISTORY_CHECKED_PG.format(
    entries="""ledger_entries AS e ON e.ledger = :ledger AND e.sequence = h.sequence
             AND e.sequence >= :low AND e.sequence <= :high"""
)

# The (account, asset) keys of a ledger's history, as the CTE `keys`: a skip
# scan of its index, one probe per key.
_HISTORY_KEYS_PG = """
    WITH RECURSIVE keys AS (
        (SELECT account, asset FROM ledger_account_history WHERE ledger = :ledger
         ORDER BY account, asset LIMIT 1)
        UNION ALL
        SELECT n.account, n.asset FROM keys AS k, LATERAL (
            SELECT account, asset FROM ledger_account_history
            WHERE ledger = :ledger AND (account, asset) > (k.account, k.asset)
            ORDER BY account, asset LIMIT 1) AS n
    )"""

# The (account, asset) of a ledger's history.
_HISTORY_ACCOUNTS_PG = (
    _HISTORY_KEYS_PG
    + """
    SELECT account, asset FROM keys LIMIT :most
"""
)


# Each account's totals in an asset right after each entry that touched it,
# summed from the entries (an entry's postings on one account and asset are
# one row), against ledger_account_history: the rows that differ, are
# missing, or have no entry, the first :shown of each account and asset with
# how many there are in all. Only those come back.
_HISTORY = """
    WITH moves (sequence, account, asset, debits, credits) AS ({moves}),
    per_entry AS (
        SELECT account, asset, sequence, sum(debits) AS debits, sum(credits) AS credits
        FROM moves GROUP BY account, asset, sequence
    ), running AS (
        SELECT account, asset, sequence,
               sum(debits) OVER w AS debits, sum(credits) OVER w AS credits
        FROM per_entry
        WINDOW w AS (PARTITION BY account, asset ORDER BY sequence ROWS UNBOUNDED PRECEDING)
    ), stored AS (
        SELECT account, asset, sequence, debits, credits
        FROM ledger_account_history WHERE ledger = :ledger
    ), wrong AS (
        SELECT COALESCE(h.account, r.account) AS account, COALESCE(h.asset, r.asset) AS asset,
               COALESCE(h.sequence, r.sequence) AS sequence,
               h.sequence IS NOT NULL AS has_row, r.sequence IS NOT NULL AS has_entry,
               h.debits AS debits, h.credits AS credits,
               r.debits AS summed_debits, r.credits AS summed_credits
        FROM stored AS h FULL JOIN running AS r
             ON r.account = h.account AND r.asset = h.asset AND r.sequence = h.sequence
        WHERE NOT COALESCE(h.debits = r.debits AND h.credits = r.credits, FALSE)
    ), counted AS (
        SELECT wrong.*,
               row_number() OVER (PARTITION BY account, asset ORDER BY sequence) AS nth,
               count(*) OVER (PARTITION BY account, asset) AS found
        FROM wrong
    )
    SELECT account, asset, sequence, has_row, has_entry, debits, credits,
           summed_debits, summed_credits, nth, found
    FROM counted WHERE nth <= :shown
    ORDER BY account, asset, sequence
"""


def verify(
    engine: Engine,
    ledgers: list[str] | None = None,
    *,
    from_sequence: int = 1,
    progress: Progress | None = None,
    workers: int = WORKERS,
) -> Iterator[Problem]:
    """The problems of `ledgers` (None: every ledger), in order; none when the
    books hold. `from_sequence` > 1 checks the chain from that entry on,
    trusting the stored hash of the one before it, and skips the totals and
    the history, which need every entry. On Postgres a large ledger is
    checked in `workers` ranges at once, beside the totals and the history
    (each on a connection of its own)."""
    with engine.connect() as conn:
        if ledgers is None:
            ledgers = list(
                conn.execute(
                    sa.union(sa.select(counters.c.ledger), sa.select(entries.c.ledger)).order_by(
                        "ledger"
                    )
                ).scalars()
            )
        in_sql = dialect.name_of(conn) == dialect.POSTGRES and (
            conn.exec_driver_sql("SHOW server_encoding").scalar() == "UTF8"
        )
        for ledger in ledgers:
            yield from _ledger(engine, conn, ledger, from_sequence, progress, in_sql, workers)


def _ledger(
    engine: Engine,
    conn: Connection,
    ledger: str,
    from_sequence: int,
    progress: Progress | None,
    in_sql: bool,
    workers: int,
) -> Iterator[Problem]:
    counter = conn.execute(
        sa.select(counters.c.value, counters.c.head_hash).where(counters.c.ledger == ledger)
    ).one_or_none()
    if counter is None:
        yield Problem(ledger, "no counter (run init-counter)")
        return
    head = counter.value
    start = max(from_sequence, 1) - 1
    start_hash = GENESIS
    if start:
        stored = conn.execute(
            sa.select(entries.c.hash).where(entries.c.ledger == ledger, entries.c.sequence == start)
        ).one_or_none()
        if stored is None or stored.hash is None:
            yield Problem(ledger, f"entry {start} missing: cannot start the chain after it")
            return
        start_hash = stored.hash
    sums = from_sequence <= 1  # the sums need every entry
    # Each range is checked from the last stored entry before it, so a
    # range's check needs nothing from the others: they can run at once.
    # Entries 1..head were committed before the counter said head; those
    # above it may be posts made while this runs (see _beyond_the_counter).
    n = workers if in_sql and head - start > 2 * PAGE else 1
    cuts = [start + (head - start) * i // n for i in range(n)] + [head]
    # On Postgres each range screens its part of the history too, right
    # after its part of the chain (the first range's from the lowest number,
    # the last's to the highest, so that every row is in one): the ranges
    # then share the whole work evenly, none left to run alone at the end.
    screen = in_sql and sums
    conn.rollback()  # idle while the ranges run: no transaction left open
    counted = _Counter(ledger, head - start, progress)
    pages = _pages_pg if in_sql else _pages_python

    def check(i: int) -> _Range:
        anchor = (start, start_hash) if i == 0 else None
        history = None
        if screen:
            history = (
                _LOWEST if i == 0 else cuts[i] + 1,
                _HIGHEST if i == n - 1 else cuts[i + 1],
            )
        return _check_range(engine, ledger, cuts[i], cuts[i + 1], anchor, pages, counted, history)

    if in_sql:
        with ThreadPoolExecutor(n, thread_name_prefix="verify") as pool:
            ranges = list(pool.map(check, range(n)))
        found = []
        if sums:
            holds = all(r.holds for r in ranges)
            with engine.connect() as own:
                found = list(_totals_and_history_pg(own, ledger, holds))
        totals_problems = [p for p in found if not p.startswith(_HISTORY_MARK)]
        history_problems = [
            p.removeprefix(_HISTORY_MARK) for p in found if p not in totals_problems
        ]
    else:
        ranges = [check(0)]
        totals_problems = _sums(engine, ledger, _totals) if sums else []
        history_problems = _sums(engine, ledger, _history) if sums else []
    for r in ranges:
        yield from (Problem(ledger, p) for p in r.problems)
    last, last_hash = start, start_hash
    for r in ranges:
        if r.last is not None:
            last, last_hash = r.last
    if last < head:
        yield Problem(ledger, _missing(last + 1, head))
    beyond = _beyond_the_counter(conn, ledger)
    if beyond is not None:
        yield Problem(ledger, beyond)
    if last == head and (counter.head_hash or GENESIS) != last_hash:
        yield Problem(ledger, f"head hash differs from entry {head}'s hash")
    yield from (Problem(ledger, p) for p in totals_problems)
    yield from (Problem(ledger, p) for p in history_problems)


def _sums(
    engine: Engine, ledger: str, check_sums: Callable[[Connection, str], Iterator[str]]
) -> list[str]:
    with engine.connect() as own:
        return list(check_sums(own, ledger))


def _beyond_the_counter(conn: Connection, ledger: str) -> str | None:
    """Entries numbered above the counter: the highest entry and the counter
    read in ONE statement, so posts made meanwhile are not mistaken for it."""
    highest = (
        sa.select(sa.func.max(entries.c.sequence))
        .where(entries.c.ledger == ledger)
        .scalar_subquery()
    )
    value = sa.select(counters.c.value).where(counters.c.ledger == ledger).scalar_subquery()
    top, counted = conn.execute(sa.select(highest, value)).one()
    conn.rollback()
    if top is None or counted is None or top <= counted:
        return None
    return f"entries up to {top} stored, beyond the counter's {counted}"


@dataclass
class _Range:
    problems: list[str]
    last: tuple[int, bytes] | None  # the range's last stored entry and its hash
    holds: bool | None = None  # whether its part of the history holds; None: not screened


class _Counter:
    """Entries checked so far, from every range, for the progress line."""

    def __init__(self, ledger: str, total: int, progress: Progress | None) -> None:
        self._ledger, self._total, self._progress = ledger, total, progress
        self._done = 0
        self._lock = threading.Lock()

    def add(self, rows: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            self._done += rows
            self._progress(self._ledger, self._done, self._total)


# pages(conn, ledger, after, previous_hash, last_sequence) -> (problems,
# rows checked, last (sequence, hash) or None) per page, in order
PageChecker = Callable[[Connection, str, int, bytes, int], Iterator[tuple[list[str], int, Any]]]


def _check_range(
    engine: Engine,
    ledger: str,
    after: int,
    through: int,
    anchor: tuple[int, bytes] | None,
    pages: PageChecker,
    counted: _Counter,
    history: tuple[int, int] | None = None,
) -> _Range:
    """The entries numbered after..through, each checked against the entry
    stored before it (`anchor`, or the last one found at or below `after`);
    then, given `history` (low, high), the history rows numbered low..high
    screened (_history_holds_pg) on the same connection."""
    with engine.connect() as conn:
        if anchor is None:
            before = conn.execute(
                sa.select(entries.c.sequence, entries.c.hash)
                .where(entries.c.ledger == ledger, entries.c.sequence <= after)
                .order_by(entries.c.sequence.desc())
                .limit(1)
            ).one_or_none()
            anchor = (0, GENESIS) if before is None else (before.sequence, before.hash or b"")
        problems: list[str] = []
        last = None
        for page_problems, rows, page_last in pages(conn, ledger, *anchor, through):
            problems += page_problems
            last = page_last
            counted.add(rows)
        if history is None:
            return _Range(problems, last)
        # The pages' transaction ended (begun by the driver's own cursor),
        # for the screen's own.
        conn.rollback()
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.rollback()
        return _Range(problems, last, _history_holds_pg(conn, ledger, *history))


def _pages_pg(
    conn: Connection, ledger: str, after: int, previous_hash: bytes, through: int
) -> Iterator[tuple[list[str], int, Any]]:
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute("SET client_encoding = 'UTF8'")  # textsend() gives the bytes as stored
    # A page (about 250 bytes a row) then stays in memory, not a temporary
    # file: a tenth faster, and still bounded per connection.
    raw.execute("SET work_mem = '64MB'")
    # No JIT: the planner counts the CASE branches' subqueries (several
    # postings, several metadata pairs) for every row, and above its cost
    # thresholds JIT inlining and optimization took longer (0.7 s a page)
    # than the page's check itself; without any JIT the page is faster still.
    raw.execute("SET jit = off")
    while True:
        params = {
            "ledger": ledger,
            "after": after,
            "through": through,
            "limit": PAGE,
            "previous_hash": previous_hash,
            "ledger_text": len(ledger.encode()).to_bytes(4, "big") + ledger.encode(),
        }
        with raw.cursor() as cursor:
            rows = cursor.execute(_CHECK_PAGE_PG, params).fetchall()
        if not rows:
            return
        problems = []
        rows.sort(key=lambda row: row[0])
        for sequence, entry_hash, previous, chained, _ in rows:
            if previous != sequence - 1:
                # What chained to the missing entries is gone: the chain resumes here.
                problems.append(_missing(previous + 1, sequence - 1))
            elif not chained:
                problems.append(_mismatch(sequence, entry_hash))
        last, last_hash, _, _, is_last = rows[-1]
        assert is_last
        checked = last - after  # the numbers covered: progress needs no more
        after, previous_hash = last, last_hash or b""
        yield problems, checked, (after, previous_hash)


def _pages_python(
    conn: Connection, ledger: str, after: int, previous_hash: bytes, through: int
) -> Iterator[tuple[list[str], int, Any]]:
    """The same checks as _CHECK_PAGE_PG, made here (SQLite, or a Postgres
    database whose encoding is not UTF-8)."""
    while True:
        rows = conn.execute(
            sa.select(entries)
            .where(
                entries.c.ledger == ledger,
                entries.c.sequence > after,
                entries.c.sequence <= through,
            )
            .order_by(entries.c.sequence)
            .limit(PAGE)
        ).all()
        if not rows:
            return
        problems = []
        for row in rows:
            if row.sequence != after + 1:
                problems.append(_missing(after + 1, row.sequence - 1))
            elif row.hash is None or row.hash != _recomputed(row, previous_hash):
                problems.append(_mismatch(row.sequence, row.hash))
            after, previous_hash = row.sequence, row.hash or b""
        yield problems, len(rows), (after, previous_hash)


def _recomputed(row: Any, previous_hash: bytes) -> bytes | None:
    """The hash of `row` chained to `previous_hash`; None when its postings
    are not what the server writes (and so not what it chained)."""
    postings = _postings_of(row.postings)
    if postings is None:
        return None
    if postings and (row.debit_account, row.credit_account, row.amount, row.asset) != (
        "",
        "",
        0,
        "",
    ):
        return None  # its single-pair columns are not covered by its hash: they must be empty
    entry = payload_from_row(row, postings)
    return chain_hash(
        previous_hash,
        row.sequence,
        epoch_micros(row.created_at),
        body_of(entry),
        version_of(entry),
    )


def _postings_of(value: Any) -> tuple[Posting, ...] | None:
    """The postings column read as _CHECK_PAGE_PG reads it: () for the single
    pair of columns (NULL, an empty array, any other JSON), the postings of a
    non-empty array, None when one of them is not [debit, credit, amount,
    asset] with strings and an int64."""
    if not isinstance(value, list) or not value:
        return ()
    postings = []
    for p in value:
        if not (isinstance(p, list) and len(p) == 4):
            return None
        debit, credit, amount, asset = p
        if not (isinstance(debit, str) and isinstance(credit, str) and isinstance(asset, str)):
            return None
        if isinstance(amount, float) and amount.is_integer():
            amount = int(amount)  # JSON 100.0: the number 100, as Postgres reads it
        if isinstance(amount, bool) or not isinstance(amount, int):
            return None
        if not -INT64_MAX - 1 <= amount <= INT64_MAX:
            return None
        postings.append(Posting(debit, credit, amount, asset))
    return tuple(postings)


def _missing(first: int, last: int) -> str:
    return f"entry {first} missing" if first == last else f"entries {first}-{last} missing"


def _mismatch(sequence: int, entry_hash: bytes | None) -> str:
    return f"entry {sequence}: " + ("hash missing" if entry_hash is None else "hash mismatch")


def _streamed(sql: str) -> sa.TextClause:
    """A statement whose rows come in batches (a server-side cursor on
    Postgres): however many accounts, memory stays bounded."""
    return sa.text(sql).execution_options(stream_results=True, max_row_buffer=1000)


def _moves(conn: Connection) -> str:
    return _MOVES_PG if dialect.name_of(conn) == dialect.POSTGRES else _MOVES_SQLITE


def _totals(conn: Connection, ledger: str) -> Iterator[str]:
    """Accounts whose stored totals differ from the sums of their entries."""
    rows = conn.execute(_streamed(_TOTALS.format(moves=_moves(conn))), {"ledger": ledger})
    for account, asset, debits, credits, summed_debits, summed_credits in rows:
        summed_d, summed_c = int(summed_debits or 0), int(summed_credits or 0)
        if debits is None:
            yield (
                f"account {account} {asset}: no stored totals, entries sum to "
                f"debits {summed_d}, credits {summed_c}"
            )
            continue
        yield from _differing(account, asset, (debits, credits), (summed_d, summed_c))


def _differing(
    account: str, asset: str, stored: tuple[int, int], summed: tuple[int, int]
) -> Iterator[str]:
    """A stored total's lines where it differs from the entries' sums."""
    for side, value, expected in zip(("debits", "credits"), stored, summed, strict=True):
        if value != expected:
            yield f"account {account} {asset}: {side} {value} != {expected} summed from entries"


def _history_holds_pg(
    conn: Connection, ledger: str, low: int = _LOWEST, high: int = _HIGHEST
) -> bool:
    """The history screen over the rows numbered low..high (by default all
    of them): True only if _HISTORY would find nothing there. Outside a
    transaction, its accounts are listed and its rows read in one snapshot
    (repeatable read): an account first posted to meanwhile (above the
    counter) is then one of those listed, or none of its rows is read."""
    if not conn.in_transaction():
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    return _screen_pg(conn, ledger, low, high, _history_accounts(conn, ledger))


def _screen_pg(
    conn: Connection, ledger: str, low: int, high: int, accounts: list[tuple[str, str]] | None
) -> bool:
    """_history_holds_pg's screen, given `accounts` (_history_accounts())."""
    nested = conn.begin_nested()  # rolled back after: the settings go with it
    try:
        params: dict[str, Any] = {"ledger": ledger, "low": low, "high": high}
        if accounts is not None:
            conn.execute(_settings(_SCREEN_SETTINGS + _MERGED_SETTINGS))
            for i, (account, asset) in enumerate(accounts):
                params[f"account{i}"], params[f"asset{i}"] = account, asset
            sql = _history_holds_merged_pg(len(accounts))
        else:
            conn.execute(_settings(_SCREEN_SETTINGS))
            sql = _HISTORY_HOLDS_PG
        return bool(conn.execute(sa.text(sql), params).scalar())
    except sa.exc.DataError:
        return False  # rows doctored beyond int64 arithmetic: _HISTORY's sums tell
    finally:
        nested.rollback()


def _history_accounts(conn: Connection, ledger: str) -> list[tuple[str, str]] | None:
    """Every (account, asset) of the ledger's history; None when there are
    more than _MERGED_ACCOUNTS (the listing stops there)."""
    params = {"ledger": ledger, "most": _MERGED_ACCOUNTS + 1}
    rows = conn.execute(sa.text(_HISTORY_ACCOUNTS_PG), params).all()
    if len(rows) > _MERGED_ACCOUNTS:
        return None
    return [(account, asset) for account, asset in rows]


# The screen's plan: every table read by a range of its index (the planner,
# misjudging the rows per account, would rather scan the whole of
# ledger_entries, every ledger's, for each range), what it holds in memory
# held there, no JIT (as the pages'), no workers beside the ranges' own.
_SCREEN_SETTINGS = (
    ("work_mem", "64MB"),
    ("jit", "off"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_memoize", "off"),  # (from Postgres 14; set only where it exists)
    ("max_parallel_workers_per_gather", "0"),
    # (Nor an index probe into the entries for each history row.)
    ("enable_nestloop", "off"),
)
# And for _history_holds_merged_pg's: the merges.
_MERGED_SETTINGS = (("enable_hashjoin", "off"),)


def _settings(settings: tuple[tuple[str, str], ...]) -> sa.TextClause:
    """SET LOCAL of each of `settings` that the server has."""
    values = ", ".join(f"('{name}', '{value}')" for name, value in settings)
    return sa.text(
        "SELECT set_config(s.name, s.value, true)"
        f" FROM (VALUES {values}) AS s(name, value)"
        " WHERE s.name IN (SELECT name FROM pg_settings)"
    )


def _history(conn: Connection, ledger: str) -> Iterator[str]:
    """Accounts whose history (ledger_account_history: the totals right after
    each entry that touched them) differs from the running sums of their
    entries. On Postgres a screen first: when it holds, nothing to name."""
    if dialect.name_of(conn) == dialect.POSTGRES:
        # The sorts stay in memory, bounded per connection, and no JIT (as
        # the pages').
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        conn.exec_driver_sql("SET LOCAL jit = off")
        if _history_holds_pg(conn, ledger):
            return
    yield from _history_problems(conn, ledger)


# Postgres, once the history holds: each stored total against its account's
# last history row (one probe each), and the history's (account, asset)
# keys counted by a skip scan of its index, which must all have a total.
# The history holds the running sums of the entries, so its last rows are
# their sums: this checks the totals as _TOTALS does, without summing.
_TOTALS_BY_HISTORY_PG = (
    _HISTORY_KEYS_PG
    + """, checked AS (
        SELECT t.account, t.asset, t.debits, t.credits, h.debits AS last_debits,
               h.credits AS last_credits
        FROM ledger_account_totals AS t LEFT JOIN LATERAL (
            SELECT debits, credits FROM ledger_account_history AS h
            WHERE h.ledger = t.ledger AND h.account = t.account AND h.asset = t.asset
            ORDER BY h.sequence DESC LIMIT 1) AS h ON true
        WHERE t.ledger = :ledger
    )
    SELECT account, asset, debits, credits, COALESCE(last_debits, 0), COALESCE(last_credits, 0),
           (SELECT count(*) FROM keys) - (SELECT count(*) FROM checked
                                          WHERE last_debits IS NOT NULL) AS untotalled
    FROM checked
    WHERE debits <> COALESCE(last_debits, 0) OR credits <> COALESCE(last_credits, 0)
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT count(*) FROM keys) - (SELECT count(*) FROM checked
                                          WHERE last_debits IS NOT NULL)
"""
)

# Marks the history's problems among _totals_and_history_pg's.
_HISTORY_MARK = "\x00history:"


def _totals_and_history_pg(
    conn: Connection, ledger: str, holds: bool | None = None
) -> Iterator[str]:
    """Both sums' problems, the history's marked: when the history holds
    (the screen, `holds` if it was made already), the totals against it;
    else both summed from the entries."""
    conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
    conn.exec_driver_sql("SET LOCAL jit = off")
    if holds is None:
        holds = _history_holds_pg(conn, ledger)
    if not holds:
        yield from _totals(conn, ledger)
        yield from (_HISTORY_MARK + p for p in _history_problems(conn, ledger))
        return
    rows = conn.execute(sa.text(_TOTALS_BY_HISTORY_PG), {"ledger": ledger}).all()
    if rows[-1].untotalled:  # entries on an account without totals: name it
        yield from _totals(conn, ledger)
        return
    for account, asset, debits, credits, summed_d, summed_c, _ in rows[:-1]:
        yield from _differing(account, asset, (debits, credits), (summed_d, summed_c))


def _history_problems(conn: Connection, ledger: str) -> Iterator[str]:
    """_HISTORY's findings: the first HISTORY_SHOWN rows of each account and
    asset that differ, are missing or have no entry, then how many more."""
    rows = conn.execute(
        _streamed(_HISTORY.format(moves=_moves(conn))), {"ledger": ledger, "shown": HISTORY_SHOWN}
    )
    for row in rows:
        where = f"account {row.account} {row.asset}"
        summed = {"debits": int(row.summed_debits or 0), "credits": int(row.summed_credits or 0)}
        if not row.has_entry:
            yield f"{where}: history row at entry {row.sequence} without an entry"
        elif not row.has_row:
            yield (
                f"{where}: no history at entry {row.sequence}, entries sum to"
                f" debits {summed['debits']}, credits {summed['credits']}"
            )
        else:
            for side, stored in (("debits", row.debits), ("credits", row.credits)):
                if stored != summed[side]:
                    yield (
                        f"{where}: history at entry {row.sequence}:"
                        f" {side} {stored} != {summed[side]} summed from entries"
                    )
        if row.nth == HISTORY_SHOWN and row.found > row.nth:
            yield f"{where}: history wrong at {row.found - row.nth} more entries"


def run(
    engine: Engine,
    ledgers: list[str] | None,
    *,
    from_sequence: int = 1,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """The command: one line per problem on `out`, progress on `err` when it
    is a terminal; exit status 0 when the books hold, else 1."""
    progress = _Progress(err) if err.isatty() else None
    found = 0
    for problem in verify(
        engine,
        ledgers,
        from_sequence=from_sequence,
        progress=progress.show if progress is not None else None,
    ):
        if progress is not None:
            progress.clear()
        print(problem, file=out, flush=True)
        found += 1
    if progress is not None:
        progress.clear()
    print(
        "verify: the books hold" if not found else f"verify: {found} problem(s)",
        file=err,
    )
    return 1 if found else 0


class _Progress:
    """One self-overwriting line: a progress bar's worth, no dependency."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._ledger = ""
        self._started = time.monotonic()

    def show(self, ledger: str, done: int, total: int) -> None:
        if ledger != self._ledger:  # each ledger's rate from its own start
            self._ledger, self._started = ledger, time.monotonic()
        rate = done / max(time.monotonic() - self._started, 1e-9)
        share = f" of {total:,} ({100 * done // total}%)" if total > 0 else ""
        self._stream.write(f"\r{ledger}: {done:,}{share} entries, {rate:,.0f}/s\x1b[K")
        self._stream.flush()

    def clear(self) -> None:
        self._stream.write("\r\x1b[K")
        self._stream.flush()
