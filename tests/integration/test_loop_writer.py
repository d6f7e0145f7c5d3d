"""The write of new entries on the event loop (storage/loop_writer.py), against
real Postgres: what it stores, what it refuses without writing (left to the
careful path), deadlines, lost connections, and concurrent writers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger_service.domain.entries import PostResult
from ledger_service.domain.errors import (
    CounterNotInitialized,
    DeadlineExceeded,
    IdempotencyConflict,
    StorageUnavailable,
)
from ledger_service.domain.limits import INT64_MAX
from ledger_service.service import use_cases
from ledger_service.storage.loop_writer import LoopWriter
from ledger_service.storage.timeouts import DbTimeouts, libpq_conninfo
from ledger_service.storage.uow import SqlUnitOfWork, create_engine, normalize_url

from ..conftest import hold_row_lock, lock_waiters_when
from .helpers import counter_value, make_entry, sequences

T = TypeVar("T")


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, pool_size=4)
    yield engine
    engine.dispose()


def with_writer(pg_url: str, scenario: Callable[[LoopWriter], Awaitable[T]], **kw: Any) -> T:
    """Runs `scenario(writer)` on a fresh event loop with an open writer."""

    async def run() -> T:
        writer = LoopWriter(normalize_url(pg_url), 4, **kw)
        try:
            async with asyncio.timeout(30):  # a write that never ends fails the test
                return await scenario(writer)
        finally:
            await writer.close()

    return asyncio.run(run())


def initialize(pg_engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(lambda **kw: SqlUnitOfWork(pg_engine, **kw), ledger)


def test_new_entries_are_stored_in_order_with_the_next_numbers(
    pg_url: str, pg_engine: Engine, ledger: str
) -> None:
    initialize(pg_engine, ledger)
    first = [make_entry(ledger, f"k{i}", amount=i + 1) for i in range(3)]
    second = [make_entry(ledger, "k3", description="x", metadata={"a": "1"})]

    async def scenario(writer: LoopWriter) -> list[list[PostResult] | None]:
        return [await use_cases.post_new(writer, b, None) for b in (first, second)]

    results = with_writer(pg_url, scenario)
    assert all(r is not None for r in results)
    posted = [r for batch in results if batch for r in batch]
    assert [r.entry.sequence for r in posted] == [1, 2, 3, 4]
    assert [r.entry.payload for r in posted] == [*first, *second]
    assert not any(r.replayed for r in posted)
    # What callers are told equals what is stored (read back by the other path).
    with SqlUnitOfWork(pg_engine) as uow:
        stored = uow.ledger.find_by_keys(ledger, [f"k{i}" for i in range(4)])
    assert [stored[r.entry.payload.idempotency_key] for r in posted] == [r.entry for r in posted]
    with pg_engine.connect() as conn:
        totals = conn.exec_driver_sql(
            "SELECT account, debits, credits FROM ledger_account_totals"
            " WHERE ledger = %(l)s ORDER BY account",
            {"l": ledger},
        ).all()
    assert [tuple(t) for t in totals] == [("cash", 106, 0), ("revenue", 0, 106)]


@pytest.mark.parametrize("case", ["stored key", "repeated key", "no counter", "overflow"])
def test_what_is_not_plainly_new_is_refused_without_writing_and_the_careful_path_decides(
    pg_url: str, pg_engine: Engine, ledger: str, case: str
) -> None:
    def uow(**kw: Any) -> SqlUnitOfWork:
        return SqlUnitOfWork(pg_engine, **kw)

    if case != "no counter":
        initialize(pg_engine, ledger)
        use_cases.post_entry(uow, make_entry(ledger, "old"))
    batch = {
        "stored key": [make_entry(ledger, "new"), make_entry(ledger, "old", amount=7)],
        "repeated key": [make_entry(ledger, "new"), make_entry(ledger, "new")],
        "no counter": [make_entry(ledger, "new")],
        "overflow": [make_entry(ledger, "new"), make_entry(ledger, "big", amount=INT64_MAX)],
    }[case]
    before = counter_value(pg_engine, ledger)

    async def scenario(writer: LoopWriter) -> list[PostResult] | None:
        return await use_cases.post_new(writer, batch, None)

    assert with_writer(pg_url, scenario) is None
    assert counter_value(pg_engine, ledger) == before  # no number taken
    assert sequences(pg_engine, ledger) == ([] if case == "no counter" else [1])

    if case == "no counter":
        with pytest.raises(CounterNotInitialized):
            use_cases.post_group(uow, batch, None, look_up_first=True)
        return
    outcomes = use_cases.post_group(uow, batch, None, look_up_first=True)
    if case == "stored key":
        assert isinstance(outcomes[0], PostResult) and outcomes[0].entry.sequence == 2
        assert isinstance(outcomes[1], IdempotencyConflict)
    elif case == "repeated key":
        assert isinstance(outcomes[1], PostResult) and outcomes[1].replayed
    elif case == "overflow":  # the entry that overflows fails alone
        assert isinstance(outcomes[0], PostResult) and outcomes[0].entry.sequence == 2
        assert not isinstance(outcomes[1], PostResult)


@pytest.mark.parametrize("locked", ["counter", "account"])
def test_the_deadline_bounds_a_lock_wait_and_nothing_is_written(
    pg_url: str, pg_engine: Engine, ledger: str, locked: str
) -> None:
    initialize(pg_engine, ledger)
    with_writer(pg_url, lambda w: use_cases.post_new(w, [make_entry(ledger, "k0")], None))
    with pg_engine.connect() as conn:
        hold_row_lock(conn, ledger, locked)
        with pytest.raises(DeadlineExceeded):
            with_writer(pg_url, lambda w: use_cases.post_new(w, [make_entry(ledger, "k1")], 0.5))
        # The statement gave up its lock wait by itself (lock_timeout).
        assert lock_waiters_when(pg_engine, 0, timeout=10) == 0
        conn.rollback()
    assert sequences(pg_engine, ledger) == [1]
    assert counter_value(pg_engine, ledger) == 1


def test_a_lost_connection_is_unavailable_then_replaced_and_the_pools_are_reset(
    pg_url: str, pg_engine: Engine, ledger: str
) -> None:
    initialize(pg_engine, ledger)
    lost: list[bool] = []

    def connection_lost() -> None:  # as the server wires it: the engine's pool too
        lost.append(True)
        pg_engine.dispose()

    conninfo = libpq_conninfo(sa.make_url(pg_url))

    async def scenario(writer: LoopWriter) -> list[int]:
        numbers = []
        for key in ("k1", "k2", "k3"):
            if key == "k2":  # as a restart would: every idle connection dies
                with psycopg.connect(conninfo, autocommit=True) as admin:
                    killed = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND application_name = 'ledger-service' AND state = 'idle'"
                    ).fetchone()
                assert killed is not None and killed[0] >= 2  # the writer's, the engine's
                with pytest.raises(StorageUnavailable):
                    await use_cases.post_new(writer, [make_entry(ledger, key)], None)
                assert lost == [True]
            results = await use_cases.post_new(writer, [make_entry(ledger, key)], None)
            assert results is not None
            numbers.append(results[0].entry.sequence)
        return numbers

    assert with_writer(pg_url, scenario, on_connection_lost=connection_lost) == [1, 2, 3]
    # The engine's pooled connection, killed too, was dropped with the rest.
    assert sequences(pg_engine, ledger) == [1, 2, 3]


def test_a_cancelled_caller_returns_at_once_and_its_write_ends_within_its_bound(
    pg_url: str, pg_engine: Engine, ledger: str
) -> None:
    """The lone caller's write runs in the caller's own task, which gRPC
    cancels when the caller goes away. The caller is answered at once; the
    statement is not cancelled through psycopg (a cancel request needs a new
    connection, which a failing network may not give) but ends by its own
    bound: here its lock wait gives up after the answer timeout, nothing is
    written, and the next write takes the next number."""
    initialize(pg_engine, ledger)

    async def scenario(writer: LoopWriter) -> int:
        with pg_engine.connect() as conn:
            hold_row_lock(conn, ledger)
            task = asyncio.create_task(use_cases.post_new(writer, [make_entry(ledger, "k1")], None))
            assert await asyncio.to_thread(lock_waiters_when, pg_engine, 1, timeout=10) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # while the lock is still held
            # The statement's lock_timeout (the answer timeout, 1 s) ends its wait.
            assert await asyncio.to_thread(lock_waiters_when, pg_engine, 0, timeout=10) == 0
            conn.rollback()
        results = await use_cases.post_new(writer, [make_entry(ledger, "k2")], None)
        assert results is not None
        return results[0].entry.sequence

    assert with_writer(pg_url, scenario, timeouts=DbTimeouts(answer=1.0)) == 1
    with pg_engine.connect() as conn:
        keys = conn.exec_driver_sql(
            "SELECT idempotency_key FROM ledger_entries WHERE ledger = %(l)s ORDER BY sequence",
            {"l": ledger},
        ).scalars()
        assert list(keys) == ["k2"]


def test_concurrent_writers_on_one_ledger_get_exactly_one_to_n(
    pg_url: str, pg_engine: Engine, ledger: str
) -> None:
    """Two writers (as two server processes) and many tasks each, batches of
    several sizes: the numbers are exactly 1..N, each batch contiguous."""
    initialize(pg_engine, ledger)

    async def scenario() -> list[list[int]]:
        writers = [LoopWriter(normalize_url(pg_url), 4) for _ in range(2)]
        try:

            async def post(i: int) -> list[int]:
                batch = [make_entry(ledger, f"k{i}-{j}") for j in range(1 + i % 3)]
                results = await use_cases.post_new(writers[i % 2], batch, None)
                assert results is not None
                return [r.entry.sequence for r in results]

            return await asyncio.gather(*(post(i) for i in range(40)))
        finally:
            for w in writers:
                await w.close()

    batches = asyncio.run(scenario())
    numbers = sorted(n for b in batches for n in b)
    assert numbers == list(range(1, len(numbers) + 1))
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)
    assert sequences(pg_engine, ledger) == numbers
