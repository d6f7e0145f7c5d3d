"""The Postgres hot path runs on the psycopg connection under SQLAlchemy's
pool (storage/pg.py): its array encodings and its handling of a connection
that breaks, on real Postgres."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import Engine

from ledger_service import service
from ledger_service.domain import INT64_MAX, StorageUnavailable
from ledger_service.storage import pg
from ledger_service.storage.uow import UnitOfWork, create_engine

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
        equal, length = pg.fetch(
            raw,
            f"SELECT %(ours)b::{cast} = %(theirs)s::{cast}, cardinality(%(ours)b::{cast})",
            {"ours": wrapped, "theirs": list(wrapped)},
        )[0]
    assert (equal, length) == (True, len(wrapped))


def test_a_connection_that_broke_is_discarded_quietly_not_handed_out_again(
    pg_engine: Engine, ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    def uow(**kw: object) -> UnitOfWork:
        return UnitOfWork(pg_engine, **kw)  # type: ignore[arg-type]

    service.initialize_counter(uow, ledger)
    with pg_engine.connect() as conn:  # the pool's only connection
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    admin_url = pg_engine.url.set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin_url) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailable):
        service.post_entry(uow, make_entry(ledger, "k1"))
    # Invalidated by the unit of work itself: the pool did not have to find
    # out by failing to reset it (which it logs as an error with a traceback).
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # The broken connection was discarded, not returned to the pool.
    assert service.post_entry(uow, make_entry(ledger, "k1")).entry.sequence == 1
    assert sequences(pg_engine, ledger) == [1]
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
