"""Every wait on the database is bounded, whatever the network does: real
Postgres behind a fault proxy (tests/faultproxy.py) that stalls connections
or makes them silent, against each kind of connection the server opens."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger_service.domain.entries import PostResult
from ledger_service.domain.errors import DeadlineExceeded, StorageUnavailable
from ledger_service.service import use_cases
from ledger_service.storage.listener import PgListener
from ledger_service.storage.loop_writer import LoopWriter
from ledger_service.storage.probe import DatabaseProbe
from ledger_service.storage.timeouts import DbTimeouts, libpq_conninfo
from ledger_service.storage.uow import SqlUnitOfWork, create_engine, normalize_url
from ledger_service.storage.watchdog import Watchdog
from ledger_service.streaming.watch import HeadWatcher

from ..conftest import hold_row_lock, lock_waiters_when, missing_requirement
from ..faultproxy import FaultProxy, kernel_drop_unavailable
from .helpers import counter_value, make_entry, sequences

# Short bounds keep the tests quick; the watchdog checks often for the same reason.
TIMEOUTS = DbTimeouts(answer=1.0, tcp=2.0)


@pytest.fixture
def watchdog() -> Watchdog:
    return Watchdog(tick=0.02)


@pytest.fixture
def proxy(pg_url: str) -> Iterator[FaultProxy]:
    upstream = sa.make_url(pg_url)
    with FaultProxy((upstream.host or "127.0.0.1", upstream.port or 5432)) as proxy:
        yield proxy


@pytest.fixture
def direct(pg_url: str) -> Iterator[Engine]:
    """The same database, not through the proxy: to set up and to check."""
    engine = create_engine(pg_url, pool_size=2)
    yield engine
    engine.dispose()


def initialize(engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(lambda **kw: SqlUnitOfWork(engine, **kw), ledger)


def run(scenario: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(60):  # a wait that never ends fails the test
            return await scenario

    return asyncio.run(bounded())


def test_every_connection_carries_keepalives_and_a_tcp_user_timeout(
    pg_url: str, ledger: str
) -> None:
    """The kernel's own view of every socket this process has to Postgres:
    the pool's, the loop writer's, the listener's and the probe's."""
    timeouts = DbTimeouts(answer=7.0, tcp=6.0)
    url = normalize_url(pg_url)
    port = url.port or 5432

    def sockets_to_postgres() -> list[socket.socket]:
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=os.dup(int(name)))
            except OSError:
                continue  # not a socket
            try:
                inet = sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET
                if inet and sock.getpeername()[1] == port:
                    found.append(sock)
                    continue
            except OSError:
                pass
            sock.close()
        return found

    def local_ports(sockets: list[socket.socket]) -> set[int]:
        ports = {s.getsockname()[1] for s in sockets}
        for s in sockets:
            s.close()
        return ports

    others = local_ports(sockets_to_postgres())  # the test session's own
    engine = create_engine(pg_url, pool_size=1, timeouts=timeouts)
    initialize(engine, ledger)

    async def scenario() -> list[tuple[int, int, int, int, int]]:
        watcher = HeadWatcher()
        listener = PgListener(url, watcher, timeouts=timeouts)
        task = asyncio.create_task(listener.run())
        writer = LoopWriter(url, 2, timeouts=timeouts)
        probe = DatabaseProbe(url, timeouts=timeouts)
        try:
            with watcher.following(), engine.connect():
                await asyncio.wait_for(listener.connected.wait(), timeout=10)
                assert await use_cases.post_new(writer, [make_entry(ledger, "k1")], None)
                assert await probe.check() is None
                found = [s for s in sockets_to_postgres() if s.getsockname()[1] not in others]
                options = [
                    (
                        s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                    )
                    for s in found
                ]
                for s in found:
                    s.close()
                return options
        finally:
            task.cancel()
            await writer.close()
            await probe.close()

    try:
        options = run(scenario())
    finally:
        engine.dispose()
    assert len(options) >= 4  # pool, writer, listener, probe
    # tcp=6: probes after 3 s of silence, every second, 3 of them; 6000 ms unacknowledged.
    assert set(options) == {(1, 3, 1, 3, 6000)}


def test_a_silent_connection_fails_the_write_at_its_deadline_and_the_next_write_works(
    proxy: FaultProxy, pg_url: str, direct: Engine, ledger: str, watchdog: Watchdog
) -> None:
    """Without the bound the write would wait for as long as the kernel
    keeps the connection (about 15 minutes): the proxy still acknowledges
    every byte, so only the server's own bound can end it."""
    initialize(direct, ledger)
    lost: list[bool] = []

    async def scenario() -> list[int]:
        writer = LoopWriter(
            normalize_url(proxy.url(pg_url)),
            4,
            on_connection_lost=lambda: lost.append(True),
            timeouts=TIMEOUTS,
            watchdog=watchdog,
        )
        try:
            first = await use_cases.post_new(writer, [make_entry(ledger, "k1")], None)
            proxy.black_hole()  # the writer's idle connection goes silent
            with pytest.raises(DeadlineExceeded, match="retry with the same idempotency key"):
                await use_cases.post_new(writer, [make_entry(ledger, "k2")], 0.5)
            assert lost == [True]
            # A fresh connection: new ones pass.
            after = await use_cases.post_new(writer, [make_entry(ledger, "k3")], 5.0)
            assert first is not None and after is not None
            return [first[0].entry.sequence, after[0].entry.sequence]
        finally:
            await writer.close()

    # k2 never reached Postgres (the proxy swallowed it), so k3 takes 2.
    assert run(scenario()) == [1, 2]
    assert sequences(direct, ledger) == [1, 2]


def test_without_a_deadline_a_silent_write_is_abandoned_after_the_answer_timeout(
    proxy: FaultProxy, pg_url: str, direct: Engine, ledger: str, watchdog: Watchdog
) -> None:
    initialize(direct, ledger)

    async def scenario() -> None:
        url = normalize_url(proxy.url(pg_url))
        writer = LoopWriter(url, 4, timeouts=TIMEOUTS, watchdog=watchdog)
        try:
            await use_cases.post_new(writer, [make_entry(ledger, "k1")], None)
            proxy.black_hole()
            with pytest.raises(StorageUnavailable, match="no answer within 1s"):
                await use_cases.post_new(writer, [make_entry(ledger, "k2")], None)
            assert await use_cases.post_new(writer, [make_entry(ledger, "k3")], None)
        finally:
            await writer.close()

    run(scenario())
    assert sequences(direct, ledger) == [1, 2]


def test_the_thread_pool_path_is_bounded_too_and_its_pool_is_reset(
    proxy: FaultProxy, pg_url: str, direct: Engine, ledger: str, watchdog: Watchdog
) -> None:
    initialize(direct, ledger)
    engine = create_engine(proxy.url(pg_url), pool_size=2, timeouts=TIMEOUTS)

    def uow(**kw: Any) -> SqlUnitOfWork:
        return SqlUnitOfWork(engine, timeouts=TIMEOUTS, watchdog=watchdog, **kw)

    try:
        assert use_cases.post_entry(uow, make_entry(ledger, "k1"), 5.0).entry.sequence == 1
        with uow(), uow():  # two pooled connections, both about to go silent
            pass
        proxy.black_hole()
        with pytest.raises(DeadlineExceeded):
            use_cases.post_entry(uow, make_entry(ledger, "k2"), 0.5)
        # The pool was reset with the cut: the next call gets a new connection.
        assert use_cases.read_rows(uow, ledger, 0, 10).head == 1
        proxy.black_hole()  # which now goes silent too
        with pytest.raises(StorageUnavailable, match="no answer within 1s"):
            use_cases.read_rows(uow, ledger, 0, 10)  # a read: no deadline but the bound
        assert use_cases.post_entry(uow, make_entry(ledger, "k3"), 5.0).entry.sequence == 2
    finally:
        engine.dispose()
    assert sequences(direct, ledger) == [1, 2]


def test_a_connection_reset_mid_statement_is_discarded_quietly_and_replaced(
    proxy: FaultProxy,
    pg_url: str,
    direct: Engine,
    ledger: str,
    watchdog: Watchdog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The careful path's write is in flight (waiting for the counter lock)
    when its connection is reset: the post is UNAVAILABLE, the connection is
    thrown away rather than reset by the pool (which would fail, and log a
    traceback), and the next post gets a fresh one. The backend lives on
    and commits once it gets the lock: the outcome was unknown, and each
    retry with the same key replays."""
    initialize(direct, ledger)
    engine = create_engine(proxy.url(pg_url), pool_size=1, timeouts=TIMEOUTS)

    def uow(**kw: Any) -> SqlUnitOfWork:
        return SqlUnitOfWork(engine, timeouts=TIMEOUTS, watchdog=watchdog, **kw)

    caplog.set_level(logging.WARNING)
    try:
        for round_ in range(3):  # the reset lands at a slightly different point each time
            with direct.connect() as conn, ThreadPoolExecutor(1) as pool:
                hold_row_lock(conn, ledger)
                post = pool.submit(use_cases.post_entry, uow, make_entry(ledger, f"k{round_}"), 10)
                assert lock_waiters_when(direct, 1, timeout=10) == 1
                proxy.reset()
                with pytest.raises(StorageUnavailable):
                    post.result(timeout=30)
                conn.rollback()
        retried = [use_cases.post_entry(uow, make_entry(ledger, f"k{i}"), 10) for i in range(3)]
        assert [r.entry.sequence for r in retried] == [1, 2, 3]
        assert use_cases.post_entry(uow, make_entry(ledger, "after"), 10).entry.sequence == 4
    finally:
        engine.dispose()
    assert sequences(direct, ledger) == [1, 2, 3, 4]
    assert "Traceback" not in caplog.text and "Exception during reset" not in caplog.text


def test_a_caller_that_goes_away_is_answered_at_once_even_when_no_cancel_gets_through(
    proxy: FaultProxy,
    pg_url: str,
    direct: Engine,
    ledger: str,
    watchdog: Watchdog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gRPC cancels a lone caller's task at its deadline. The write is not
    cancelled through psycopg (whose cancel request needs a new connection,
    which a stalled network does not give): the caller returns at once, and
    the statement ends within its own bound. Its outcome is unknown, so the
    caller retries with the same key: one entry, no gap."""
    initialize(direct, ledger)
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        url = normalize_url(proxy.url(pg_url))
        writer = LoopWriter(url, 4, timeouts=TIMEOUTS, watchdog=watchdog)
        try:
            await use_cases.post_new(writer, [make_entry(ledger, "k1")], None)
            proxy.stall()
            task = asyncio.create_task(use_cases.post_new(writer, [make_entry(ledger, "k2")], 1.0))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await writer.close()  # returns once the statement's bound has cut it
            proxy.resume()
        finally:
            await writer.close()

    run(scenario())
    assert "query cancellation failed" not in caplog.text

    def uow(**kw: Any) -> SqlUnitOfWork:
        return SqlUnitOfWork(direct, **kw)

    # The held statement may have been delivered on resume: either way the
    # retry answers with k2's one entry.
    retried = use_cases.post_entry(uow, make_entry(ledger, "k2"), 5.0)
    assert retried.entry.sequence == 2
    assert sequences(direct, ledger) == [1, 2]
    assert counter_value(direct, ledger) == 2


def test_a_silent_listen_connection_is_replaced(
    proxy: FaultProxy, pg_url: str, watchdog: Watchdog
) -> None:
    conninfo = libpq_conninfo(sa.make_url(pg_url))

    def listen_backends(name: str) -> dict[int, int]:
        """pid -> client port of the listener's backends (a silent one lives on)."""
        with psycopg.connect(conninfo) as conn:
            rows = conn.execute(
                "SELECT pid, client_port FROM pg_stat_activity WHERE application_name = %s",
                (name,),
            ).fetchall()
        return dict(rows)

    async def scenario() -> None:
        watcher = HeadWatcher()
        listener = PgListener(
            normalize_url(proxy.url(pg_url)),
            watcher,
            probe_every=0.2,
            timeouts=TIMEOUTS,
            watchdog=watchdog,
        )
        task = asyncio.create_task(listener.run())
        try:
            with watcher.following():
                await listener.connected.wait()
                ((_, port),) = listen_backends(listener.application_name).items()
                assert proxy.black_hole(upstream_port=port)
                while listener.connected.is_set():  # noqa: ASYNC110 (the probe notices)
                    await asyncio.sleep(0.02)
                await listener.connected.wait()
                while len(listen_backends(listener.application_name)) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # the new one, beside the silent one
                woken = watcher.event("some-ledger")
                with psycopg.connect(conninfo, autocommit=True) as other:
                    other.execute("SELECT pg_notify('ledger_entries', 'some-ledger:1')")
                await woken.wait()  # the new connection delivers
        finally:
            task.cancel()

    run(scenario())


def test_the_probe_reports_a_silent_database_and_recovers_on_a_new_connection(
    proxy: FaultProxy, pg_url: str, watchdog: Watchdog
) -> None:
    async def scenario() -> list[str | None]:
        url = normalize_url(proxy.url(pg_url))
        probe = DatabaseProbe(url, timeouts=TIMEOUTS, watchdog=watchdog)
        try:
            before = await probe.check()
            proxy.black_hole()
            silent = await probe.check()
            after = await probe.check()
            return [before, silent, after]
        finally:
            await probe.close()

    assert run(scenario()) == [None, "the database gave no answer within 1s", None]


def test_keepalives_drop_a_connection_the_network_lost_without_the_answer_bound(
    proxy: FaultProxy, pg_url: str, direct: Engine, ledger: str
) -> None:
    """The kernel drops the packets of the open connections, as a lost NAT
    entry would; the answer bound is far off, so only TCP keepalives and
    tcp_user_timeout (2 s) can end the wait."""
    reason = kernel_drop_unavailable()
    if reason is not None:
        missing_requirement(reason)
    initialize(direct, ledger)
    timeouts = DbTimeouts(answer=120.0, tcp=2.0)

    async def scenario() -> list[PostResult] | None:
        writer = LoopWriter(normalize_url(proxy.url(pg_url)), 4, timeouts=timeouts)
        try:
            await use_cases.post_new(writer, [make_entry(ledger, "k1")], None)
            proxy.drop()
            with pytest.raises(StorageUnavailable):
                async with asyncio.timeout(30):  # far below the answer bound
                    await use_cases.post_new(writer, [make_entry(ledger, "k2")], None)
            return await use_cases.post_new(writer, [make_entry(ledger, "k3")], None)
        finally:
            await writer.close()

    result = run(scenario())
    assert result is not None and result[0].entry.sequence == 2
