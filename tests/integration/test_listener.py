"""The process's LISTEN connection against real Postgres: it exists only while
something in the process follows a ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import sqlalchemy as sa

from ledger_service.storage.listener import PgListener
from ledger_service.storage.timeouts import libpq_conninfo
from ledger_service.streaming.watch import HeadWatcher


def listen_backends(pg_url: str, application_name: str) -> list[int]:
    conninfo = libpq_conninfo(sa.make_url(pg_url))
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
    return [pid for (pid,) in rows]


async def until(condition: Callable[[], bool]) -> None:
    # Polled: the conditions include the database's view (pg_stat_activity),
    # which no event announces.
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def test_the_listener_connects_only_while_something_follows(pg_url: str) -> None:
    async def scenario() -> None:
        watcher = HeadWatcher()
        listener = PgListener(sa.make_url(pg_url), watcher, linger=0.2)
        name = listener.application_name
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.sleep(0.5)
            assert not listener.connected.is_set()  # nothing follows: no connection
            assert listen_backends(pg_url, name) == []
            with watcher.following():
                await asyncio.wait_for(listener.connected.wait(), timeout=10)
                assert len(listen_backends(pg_url, name)) == 1
                woken = watcher.event("some-ledger")  # as a tail reader takes it
                conninfo = libpq_conninfo(sa.make_url(pg_url))
                with psycopg.connect(conninfo, autocommit=True) as other:
                    other.execute("SELECT pg_notify('ledger_entries', 'some-ledger:1')")
                await asyncio.wait_for(woken.wait(), timeout=10)  # another process's commit
            # The last follower left: the connection closes after the linger.
            await until(lambda: not listener.connected.is_set())
            await until(lambda: listen_backends(pg_url, name) == [])
            with watcher.following():  # and comes back with the next follower
                await asyncio.wait_for(listener.connected.wait(), timeout=10)
        finally:
            task.cancel()

    asyncio.run(scenario())
