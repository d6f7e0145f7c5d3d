"""The Postgres hot path runs on the psycopg connection under SQLAlchemy's
pool (storage/pg.py): its array encodings and its handling of a connection
that breaks, on real Postgres."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from sqlalchemy.engine import Engine

from ledger_service.domain.errors import AccountTotalOverflow, StorageUnavailable
from ledger_service.domain.limits import INT64_MAX
from ledger_service.service import use_cases
from ledger_service.storage import pg
from ledger_service.storage.timeouts import libpq_conninfo
from ledger_service.storage.uow import SqlUnitOfWork, create_engine

from ..conftest import lock_waiters_when
from .helpers import make_entry, sequences


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, pool_size=1)
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    ("wrapped", "cast"),
    [
        (pg.TextArray(["", "a", "ünï 🧾", "x" * 5000, 'it\'s, "quoted" {}']), "text[]"),
        (pg.TextArray(), "text[]"),
        (pg.BigintArray([0, 1, -1, INT64_MAX, -INT64_MAX - 1]), "bigint[]"),
        (pg.BigintArray(), "bigint[]"),
        (pg.ByteaArray([b"", b"\x00\x01\xff", bytes(range(256))]), "bytea[]"),
        (pg.ByteaArray(), "bytea[]"),
    ],
)
def test_array_parameters_reach_postgres_exactly(
    pg_engine: Engine, wrapped: list[object], cast: str
) -> None:
    # Compared inside Postgres with psycopg's own encoding of the same list.
    with pg_engine.connect() as conn:
        raw = pg.driver(conn)
        row = raw.execute(
            f"SELECT %(ours)b::{cast} = %(theirs)s::{cast}, cardinality(%(ours)b::{cast})",
            {"ours": wrapped, "theirs": list(wrapped)},
        ).fetchone()
    assert row is not None
    assert tuple(row) == (True, len(wrapped))


def test_a_connection_that_broke_is_discarded_quietly_not_handed_out_again(
    pg_engine: Engine, ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    def uow(**kw: object) -> SqlUnitOfWork:
        return SqlUnitOfWork(pg_engine, **kw)  # type: ignore[arg-type]

    use_cases.initialize_counter(uow, ledger)
    with pg_engine.connect() as conn:  # the pool's only connection
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    admin_url = libpq_conninfo(pg_engine.url)
    with psycopg.connect(admin_url) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailable):
        use_cases.post_entry(uow, make_entry(ledger, "k1"))
    # Invalidated by the unit of work itself: the pool did not have to find
    # out by failing to reset it (which it logs as an error with a traceback).
    pool_errors = [r for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    assert not pool_errors, caplog.text
    # The broken connection was discarded, not returned to the pool.
    assert use_cases.post_entry(uow, make_entry(ledger, "k1")).entry.sequence == 1
    assert sequences(pg_engine, ledger) == [1]
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid


def test_failed_writes_do_not_spoil_the_connection_for_the_next(
    pg_engine: Engine, ledger: str
) -> None:
    """One pooled connection, writes failing inside the one-round-trip
    transaction (an overflowing total) between good ones, past psycopg's
    prepare threshold: every good write still works, numbered 1..N."""

    def uow(**kw: object) -> SqlUnitOfWork:
        return SqlUnitOfWork(pg_engine, **kw)  # type: ignore[arg-type]

    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(
        uow, make_entry(ledger, "big", debit_account="x", credit_account="y", amount=INT64_MAX)
    )
    for i in range(12):
        with pytest.raises(AccountTotalOverflow):
            use_cases.post_entry(
                uow, make_entry(ledger, f"over-{i}", debit_account="x", credit_account="z")
            )
        use_cases.post_entry(uow, make_entry(ledger, f"ok-{i}"))
    assert sequences(pg_engine, ledger) == list(range(1, 14))


def test_a_writer_waiting_on_an_account_row_does_not_hold_the_counter(
    pg_engine: Engine, pg_url: str, ledger: str
) -> None:
    """The statement locks account rows before the counter row: a post stuck
    behind another transaction's lock on one of its accounts must not stop
    posts to other accounts of the ledger (it would if it took the counter
    first)."""
    engine = create_engine(pg_url, pool_size=4)

    def uow(**kw: object) -> SqlUnitOfWork:
        return SqlUnitOfWork(engine, **kw)  # type: ignore[arg-type]

    try:
        use_cases.initialize_counter(uow, ledger)
        use_cases.post_entry(
            uow, make_entry(ledger, "first", debit_account="a", credit_account="b")
        )
        with ThreadPoolExecutor(1) as pool, engine.connect() as holder:
            holder.exec_driver_sql(
                "SELECT * FROM ledger_account_totals WHERE ledger = %(l)s AND account = 'a'"
                " FOR UPDATE",
                {"l": ledger},
            )
            stuck = pool.submit(
                use_cases.post_entry, uow, make_entry(ledger, "stuck", debit_account="a"), 30.0
            )
            try:
                assert lock_waiters_when(engine, 1, timeout=5) == 1
                # Other accounts go ahead, within a deadline, while "stuck" waits.
                other = use_cases.post_entry(
                    uow, make_entry(ledger, "other", debit_account="c", credit_account="d"), 5.0
                )
                assert other.entry.sequence == 2
                assert not stuck.done()
            finally:
                holder.rollback()  # before the pool waits for "stuck"
            assert stuck.result(timeout=30).entry.sequence == 3
        assert sequences(engine, ledger) == [1, 2, 3]
    finally:
        engine.dispose()
