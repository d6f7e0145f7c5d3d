"""The benchmark's Postgres: a throwaway database per run, a seeded ledger to
stream, and the check that a gap-free server's run left its ledger 1..N."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
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


def check_gap_free(url: str, ledger: str) -> None:
    """A gap-free server's run must leave its ledger numbered exactly 1..N,
    N being the counter's value: a baseline that skipped the guarantee would
    be measuring something else."""
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


def seed(url: str, ledger: str, n: int) -> None:
    """n entries straight into the tables, stored encodings, hash chain and
    account totals included, so that the ledger verifies clean (posting a
    million through the API would measure the write path again, not the
    stream or `verify`)."""
    import psycopg

    from ledger_service.api import wire
    from ledger_service.domain.chain import GENESIS, body_of, chain_hash, hash_field
    from ledger_service.domain.validation import validate_new_entry

    conninfo = libpq_conninfo(sa.make_url(url))
    start_micros = 1_764_633_600_000_000  # one entry per microsecond from here
    previous = GENESIS
    with psycopg.connect(conninfo) as conn:
        for start in range(1, n + 1, 50_000):
            sequences = list(range(start, min(n, start + 49_999) + 1))
            payloads, hashes = [], []
            for s in sequences:
                entry = validate_new_entry(
                    ledger=ledger,
                    idempotency_key=f"seed-{s}",
                    debit_account="cash",
                    credit_account="sales",
                    amount=1 + s % 1000,
                    asset="USD",
                    entry_type="sale",
                    description="seeded entry",
                    metadata={"order": "42"},
                )
                previous = chain_hash(previous, s, start_micros + s, body_of(entry))
                hashes.append(previous)
                payloads.append(wire.payload(entry) + hash_field(previous))
            conn.execute(
                "INSERT INTO ledger_entries (ledger, sequence, idempotency_key, debit_account,"
                " credit_account, amount, asset, entry_type, description, metadata, created_at,"
                " wire, hash)"
                " SELECT %(l)s, t.s, 'seed-' || t.s, 'cash', 'sales', 1 + t.s %% 1000, 'USD',"
                " 'sale', 'seeded entry', '{\"order\": \"42\"}'::jsonb,"
                " TIMESTAMPTZ 'epoch' + (%(t)s + t.s) * INTERVAL '1 microsecond', t.w, t.h"
                " FROM unnest(%(s)b::bigint[], %(w)b::bytea[], %(h)b::bytea[]) AS t(s, w, h)",
                {"l": ledger, "s": sequences, "w": payloads, "h": hashes, "t": start_micros},
            )
        total = sum(1 + s % 1000 for s in range(1, n + 1))
        conn.execute(
            "INSERT INTO ledger_counters (ledger, value, created_at, head_hash)"
            " VALUES (%s, %s, now(), %s)",
            (ledger, n, previous),
        )
        conn.execute(
            "INSERT INTO ledger_account_totals VALUES (%s, 'cash', 'USD', %s, 0),"
            " (%s, 'sales', 'USD', 0, %s)",
            (ledger, total, ledger, total),
        )
        conn.execute("ANALYZE ledger_entries")
