"""`ledger-service verify`: the books checked against themselves, read
straight from the database (docs/integrity.md).

Per ledger: the numbers are exactly 1..N (N: the counter's value), every hash
recomputes from the entry's columns and chains to the previous entry's stored
hash, the counter's head hash is entry N's, and every account total equals
the sum of its entries. Entries are read in keyset pages, so memory stays
bounded whatever the ledger's size. On Postgres the canonical bytes and the
hashes are computed by the database, in the query (a second implementation
of the encoding, held to the same test vectors as the clients'); on SQLite,
here.
"""

from __future__ import annotations

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

from ..domain.chain import GENESIS, body_of, chain_hash
from ..domain.entries import epoch_micros
from ..storage import dialect
from ..storage.repository import entry_from_row
from ..storage.schema import account_totals, counters, entries

PAGE = 50_000
WORKERS = max(1, min(os.cpu_count() or 1, 4))

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


# One page of a ledger's entries, checked: for each entry the number before
# it and whether its stored hash is SHA-256(previous stored hash || canonical
# bytes), the canonical bytes built column by column as docs/integrity.md
# defines them. Only problems come back, and the page's last entry.
_CHECK_PAGE_PG = f"""
    WITH page AS (
        SELECT sequence, hash,
               '\\x01'::BYTEA || int8send(sequence)
               -- Microseconds since the epoch, exactly, without numeric
               -- arithmetic: whole seconds, then the microseconds within.
               || int8send(date_part('epoch', date_trunc('second', created_at))::BIGINT
                           * 1000000 + date_part('microseconds', created_at)::BIGINT %% 1000000)
               -- The WHERE clause fixes the ledger: its bytes are the parameter's.
               || %(ledger_text)s::BYTEA || {_text("idempotency_key")}
               || '\\x00000001'::BYTEA || {_text("debit_account")} || {_text("credit_account")}
               || int8send(amount) || {_text("asset")}
               || {_text("entry_type")} || {_text("description")}
               || CASE jsonb_array_length(pairs)
                      WHEN 0 THEN '\\x00000000'::BYTEA
                      -- One pair, the common case, needs no sort and no subquery.
                      WHEN 1 THEN '\\x00000001'::BYTEA || {_text("pairs->0->>'key'")}
                                  || {_text("pairs->0->>'value'")}
                      ELSE (SELECT int4send(count(*)::INT) || string_agg(
                                {_text("key")} || {_text("value")}, ''::BYTEA
                                ORDER BY textsend(key))
                            FROM jsonb_each_text(metadata)) END
               || {_text("posted_by")} AS canonical
        FROM ledger_entries,
             LATERAL jsonb_path_query_array(metadata, '$.keyvalue()') AS pairs
        WHERE ledger = %(ledger)s AND sequence > %(after)s AND sequence <= %(through)s
        ORDER BY sequence
        LIMIT %(limit)s
    ), checked AS (
        SELECT sequence, hash,
               lag(sequence, 1, %(after)s::BIGINT) OVER w AS previous,
               hash IS NOT DISTINCT FROM
                   sha256(lag(hash, 1, %(previous_hash)s::BYTEA) OVER w || canonical) AS chained
        FROM page
        WINDOW w AS (ORDER BY sequence)
    )
    SELECT sequence, hash, previous, chained FROM checked
    WHERE NOT chained OR previous <> sequence - 1
    UNION ALL  -- and last, the page's last entry: where the next page starts
    (SELECT sequence, hash, sequence - 1, true FROM page ORDER BY sequence DESC LIMIT 1)
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
    trusting the stored hash of the one before it, and skips the totals,
    which need every entry. On Postgres a large ledger is checked in
    `workers` ranges at once (each on a connection of its own)."""
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
    conn.rollback()  # idle while the ranges run: no transaction left open
    # Each range is checked from the last stored entry before it, so a
    # range's check needs nothing from the others: they can run at once.
    # Entries 1..head were committed before the counter said head; those
    # above it may be posts made while this runs (see _beyond_the_counter).
    n = workers if in_sql and head - start > 2 * PAGE else 1
    cuts = [start + (head - start) * i // n for i in range(n)] + [head]
    counted = _Counter(ledger, head - start, progress)
    pages = _pages_pg if in_sql else _pages_python

    def check(i: int) -> _Range:
        anchor = (start, start_hash) if i == 0 else None
        return _check_range(engine, ledger, cuts[i], cuts[i + 1], anchor, pages, counted)

    def totals() -> list[str]:
        if from_sequence > 1:
            return []
        with engine.connect() as own:
            return list(_totals(own, ledger))

    if n == 1:
        ranges, totals_problems = [check(0)], totals()
    else:
        # The totals too, at once: they fill the cores a range leaves idle.
        with ThreadPoolExecutor(n + 1, thread_name_prefix="verify") as pool:
            summed = pool.submit(totals)
            ranges = list(pool.map(check, range(n)))
            totals_problems = summed.result()
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
) -> _Range:
    """The entries numbered after..through, each checked against the entry
    stored before it (`anchor`, or the last one found at or below `after`)."""
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
        return _Range(problems, last)


def _pages_pg(
    conn: Connection, ledger: str, after: int, previous_hash: bytes, through: int
) -> Iterator[tuple[list[str], int, Any]]:
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute("SET client_encoding = 'UTF8'")  # textsend() gives the bytes as stored
    # A page (about 250 bytes a row) then stays in memory, not a temporary
    # file: a tenth faster, and still bounded per connection.
    raw.execute("SET work_mem = '64MB'")
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
        for sequence, entry_hash, previous, chained in sorted(rows[:-1], key=lambda row: row[0]):
            if previous != sequence - 1:
                # What chained to the missing entries is gone: the chain resumes here.
                problems.append(_missing(previous + 1, sequence - 1))
            elif not chained:
                problems.append(_mismatch(sequence, entry_hash))
        checked = rows[-1][0] - after  # the numbers covered: progress needs no more
        after, previous_hash = rows[-1][0], rows[-1][1] or b""
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
            elif row.hash != _recomputed(row, previous_hash):
                problems.append(_mismatch(row.sequence, row.hash))
            after, previous_hash = row.sequence, row.hash or b""
        yield problems, len(rows), (after, previous_hash)


def _recomputed(row: Any, previous_hash: bytes) -> bytes:
    entry = entry_from_row(row)
    return chain_hash(
        previous_hash, entry.sequence, epoch_micros(entry.created_at), body_of(entry.payload)
    )


def _missing(first: int, last: int) -> str:
    return f"entry {first} missing" if first == last else f"entries {first}-{last} missing"


def _mismatch(sequence: int, entry_hash: bytes | None) -> str:
    return f"entry {sequence}: " + ("hash missing" if entry_hash is None else "hash mismatch")


def _totals(conn: Connection, ledger: str) -> Iterator[str]:
    """Accounts whose stored totals differ from the sums of their entries."""
    e = entries
    moves = sa.union_all(
        sa.select(
            e.c.debit_account.label("account"),
            e.c.asset,
            e.c.amount.label("debits"),
            sa.literal(0, sa.BigInteger).label("credits"),
        ).where(e.c.ledger == ledger),
        sa.select(
            e.c.credit_account.label("account"),
            e.c.asset,
            sa.literal(0, sa.BigInteger).label("debits"),
            e.c.amount.label("credits"),
        ).where(e.c.ledger == ledger),
    ).subquery()
    sums = (
        sa.select(
            moves.c.account,
            moves.c.asset,
            sa.func.sum(moves.c.debits).label("debits"),
            sa.func.sum(moves.c.credits).label("credits"),
        )
        .group_by(moves.c.account, moves.c.asset)
        .subquery()
    )
    t = sa.select(account_totals).where(account_totals.c.ledger == ledger).subquery()
    # Both ways round: a total without entries, and entries without a total.
    on = sa.and_(sums.c.account == t.c.account, sums.c.asset == t.c.asset)
    stored_side = sa.select(
        t.c.account.label("account"),
        t.c.asset.label("asset"),
        t.c.debits.label("debits"),
        t.c.credits.label("credits"),
        sums.c.debits.label("summed_debits"),
        sums.c.credits.label("summed_credits"),
    ).select_from(t.outerjoin(sums, on))
    summed_only = (
        sa.select(
            sums.c.account,
            sums.c.asset,
            sa.null(),
            sa.null(),
            sums.c.debits,
            sums.c.credits,
        )
        .select_from(sums.outerjoin(t, on))
        .where(t.c.account.is_(None))
    )
    both = sa.union_all(stored_side, summed_only).subquery()
    for account, asset, debits, credits, summed_debits, summed_credits in conn.execute(
        sa.select(both).order_by(both.c.account, both.c.asset)
    ):
        summed_d, summed_c = int(summed_debits or 0), int(summed_credits or 0)
        if debits is None:
            yield (
                f"account {account} {asset}: no stored totals, entries sum to "
                f"debits {summed_d}, credits {summed_c}"
            )
            continue
        if debits != summed_d:
            yield f"account {account} {asset}: debits {debits} != {summed_d} summed from entries"
        if credits != summed_c:
            yield f"account {account} {asset}: credits {credits} != {summed_c} summed from entries"


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
