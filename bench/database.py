"""The benchmark's Postgres: a throwaway database per run, seeded ledgers to
stream, verify and read (as of an earlier entry, a page of accounts at a
time), and the check that a gap-free server's run left its ledger 1..N."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from ledger_service.storage.timeouts import libpq_conninfo
from ledger_service.storage.uow import create_engine

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def bench_database() -> Iterator[str]:
    given = os.environ.get("LEDGER_BENCH_DATABASE_URL")
    if given:
        yield given
        return
    name = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(ADMIN_URL).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def check_gap_free(url: str, ledger: str) -> int:
    """A gap-free server's run must leave its ledger numbered exactly 1..N,
    N being the counter's value: a baseline that skipped the guarantee would
    be measuring something else. Returns N."""
    import psycopg

    with psycopg.connect(libpq_conninfo(sa.make_url(url))) as conn:
        row = conn.execute(
            "SELECT c.value, count(e.sequence), coalesce(min(e.sequence), 1),"
            " coalesce(max(e.sequence), 0)"
            " FROM ledger_counters c LEFT JOIN ledger_entries e ON e.ledger = c.ledger"
            " WHERE c.ledger = %s GROUP BY c.value",
            (ledger,),
        ).fetchone()
    if row is None:
        raise RuntimeError(f"{ledger}: no counter")
    value, count, first, last = row
    if not (count == value == last and first == 1 and count > 0):
        raise RuntimeError(
            f"{ledger}: counter {value}, {count} entries numbered {first}..{last}: not 1..N"
        )
    return int(value)


def entries_per_write(url: str, ledgers: list[str]) -> float:
    """The entries of `ledgers` per write statement that numbered them:
    this server's write takes one timestamp for all the entries it numbers
    (storage/numbering.py), so its writes are the distinct (ledger,
    created_at) pairs. How large the groups of group commit were."""
    import psycopg

    with psycopg.connect(libpq_conninfo(sa.make_url(url))) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (ledger, created_at)) FROM ledger_entries"
            " WHERE ledger = ANY(%s)",
            (ledgers,),
        ).fetchone()
    assert row is not None
    return float(row[0] / row[1]) if row[1] else float("nan")


# The seeded ledger's hot account: every 10th entry debits it instead of
# "cash", so that it holds a tenth of the ledger's entries (100k of 1M), the
# account GetAccount's as-of reads are measured on.
HOT = "hot"
# And its rare account: the entries numbered RARE_OFFSET modulo 100 (5, 105,
# 205, ...; never one of the hot account's) debit it instead of "cash", so
# that it holds exactly a hundredth of them (10k of 1M): the account a
# filtered StreamEntries catches up on.
RARE = "rare"
RARE_OFFSET = 5


def seeded_debit(sequence: int) -> str:
    """The account entry `sequence` of the seeded ledger debits."""
    if sequence % 10 == 0:
        return HOT
    return RARE if sequence % 100 == RARE_OFFSET else "cash"


def rare_entries(n: int) -> list[int]:
    """The numbers of the rare account's entries among 1..n."""
    return list(range(RARE_OFFSET, n + 1, 100))


def seeded_amount(sequence: int) -> int:
    return 1 + sequence % 1000


def hot_debits(n: int) -> list[int]:
    """The hot account's debit total after each of its entries among 1..n:
    [0, after entry 10, after entry 20, ...] (index: sequence // 10)."""
    out = [0]
    for s in range(10, n + 1, 10):
        out.append(out[-1] + seeded_amount(s))
    return out


def seed(url: str, ledger: str, n: int, debit_of: Callable[[int], str] = seeded_debit) -> None:
    """n entries straight into the tables, stored encodings, hash chain,
    account totals and account history included, so that the ledger
    verifies clean (posting a million through the API would measure the
    write path again, not the stream or `verify`). Entry s debits
    `debit_of(s)` and credits "sales" 1 + s % 1000 USD.

    The history is what the server's write statement writes: per entry, one
    row per (account, asset) it touches, with that account's running debits
    and credits right after it (the debited accounts are never credited,
    "sales" never debited, so one side of each row is 0)."""
    import psycopg

    from ledger_service.api import wire
    from ledger_service.domain.chain import GENESIS, body_of, chain_hash, hash_field
    from ledger_service.domain.validation import validate_new_entry

    conninfo = libpq_conninfo(sa.make_url(url))
    start_micros = 1_764_633_600_000_000  # one entry per microsecond from here
    previous = GENESIS
    debited: dict[str, int] = {}  # running debits per debited account
    credited = 0  # the running credits of "sales"
    chunk = 50_000
    with psycopg.connect(conninfo) as conn:
        for start in range(1, n + 1, chunk):
            sequences = list(range(start, min(n, start + chunk - 1) + 1))
            payloads, hashes, accounts = [], [], []
            h_accounts: list[str] = []
            h_sequences: list[int] = []
            h_debits: list[int] = []
            h_credits: list[int] = []
            for s in sequences:
                account, amount = debit_of(s), seeded_amount(s)
                if account == "sales":
                    raise ValueError("a seeded entry cannot debit the account it credits")
                entry = validate_new_entry(
                    ledger=ledger,
                    idempotency_key=f"seed-{s}",
                    debit_account=account,
                    credit_account="sales",
                    amount=amount,
                    asset="USD",
                    entry_type="sale",
                    description="seeded entry",
                    metadata={"order": "42"},
                )
                previous = chain_hash(previous, s, start_micros + s, body_of(entry))
                hashes.append(previous)
                payloads.append(wire.payload(entry) + hash_field(previous))
                accounts.append(account)
                debited[account] = debited.get(account, 0) + amount
                credited += amount
                h_accounts += (account, "sales")
                h_sequences += (s, s)
                h_debits += (debited[account], 0)
                h_credits += (0, credited)
            conn.execute(
                "INSERT INTO ledger_entries (ledger, sequence, idempotency_key, debit_account,"
                " credit_account, amount, asset, entry_type, description, metadata, created_at,"
                " wire, hash)"
                " SELECT %(l)s, t.s, 'seed-' || t.s, t.a, 'sales', 1 + t.s %% 1000, 'USD',"
                " 'sale', 'seeded entry', '{\"order\": \"42\"}'::jsonb,"
                " TIMESTAMPTZ 'epoch' + (%(t)s + t.s) * INTERVAL '1 microsecond', t.w, t.h"
                " FROM unnest(%(s)b::bigint[], %(a)s::text[], %(w)b::bytea[], %(h)b::bytea[])"
                " AS t(s, a, w, h)",
                {
                    "l": ledger,
                    "s": sequences,
                    "a": accounts,
                    "w": payloads,
                    "h": hashes,
                    "t": start_micros,
                },
            )
            conn.execute(
                "INSERT INTO ledger_account_history"
                " (ledger, account, asset, sequence, debits, credits)"
                " SELECT %(l)s, h.a, 'USD', h.s, h.d, h.c"
                " FROM unnest(%(a)s::text[], %(s)b::bigint[], %(d)b::bigint[], %(c)b::bigint[])"
                " AS h(a, s, d, c)",
                {"l": ledger, "a": h_accounts, "s": h_sequences, "d": h_debits, "c": h_credits},
            )
        conn.execute(
            "INSERT INTO ledger_counters (ledger, value, created_at, head_hash)"
            " VALUES (%s, %s, now(), %s)",
            (ledger, n, previous),
        )
        names = [*debited, "sales"]
        conn.execute(
            "INSERT INTO ledger_account_totals (ledger, account, asset, debits, credits)"
            " SELECT %(l)s, t.a, 'USD', t.d, t.c"
            " FROM unnest(%(a)s::text[], %(d)b::bigint[], %(c)b::bigint[]) AS t(a, d, c)",
            {
                "l": ledger,
                "a": names,
                "d": [*debited.values(), 0],
                "c": [0] * len(debited) + [credited],
            },
        )
        conn.execute("ANALYZE ledger_entries")
        conn.execute("ANALYZE ledger_account_history")
        conn.execute("ANALYZE ledger_account_totals")
