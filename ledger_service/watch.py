"""Wakes following streams when a ledger gets new entries.

One HeadWatcher per server process. Posts in this process publish to it after
commit; on Postgres one LISTEN connection per process (PgListener) publishes
commits made by every process, while the process has live followers: every
commit notifies every listening process, so a process that follows nothing
does not listen (it would wake for each commit of the whole cluster for
nothing). Streams also poll, so a lost notification only delays delivery,
never loses an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import psycopg
import sqlalchemy as sa

from .storage.dialect import NOTIFY_CHANNEL
from .storage.timeouts import DEFAULT_TIMEOUTS, AsyncConnections, DbTimeouts
from .storage.watchdog import WATCHDOG, Watchdog

log = logging.getLogger(__name__)


class HeadWatcher:
    """Per-ledger wake-up events, used on the event loop's thread only."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._following = 0
        # Set while something in this process follows a ledger (see following()).
        self.wanted = asyncio.Event()

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Marks a live reader of a ledger for its lifetime: while any is
        active, this process listens for other processes' commits."""
        self._following += 1
        self.wanted.set()
        try:
            yield
        finally:
            self._following -= 1
            if not self._following:
                self.wanted.clear()

    def event(self, ledger: str) -> asyncio.Event:
        """Take this BEFORE reading, then wait on it: a commit published after
        the read began sets it, so no wake-up falls between read and wait."""
        ev = self._events.get(ledger)
        if ev is None:
            ev = self._events[ledger] = asyncio.Event()
        return ev

    def publish(self, ledger: str) -> None:
        ev = self._events.pop(ledger, None)
        if ev is not None:
            ev.set()

    def publish_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()


class PgListener:
    """The process's one LISTEN connection, open while the process has live
    followers (and `linger` seconds after the last one left, so followers that
    come and go do not reconnect each time); reconnects with backoff.

    A connection that has gone silent looks just like one with nothing to
    say, so after `probe_every` seconds without a notification it is asked a
    `SELECT 1`; with no answer in time it is replaced. Followers meanwhile
    poll, so they still get every entry."""

    def __init__(
        self,
        url: sa.URL,
        watcher: HeadWatcher,
        *,
        linger: float = 30.0,
        probe_every: float = 1.0,
        timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
        watchdog: Watchdog = WATCHDOG,
    ) -> None:
        self._db = AsyncConnections(url, timeouts, watchdog)
        self._watcher = watcher
        self._linger = linger
        self._probe_every = probe_every
        # Names the connection in pg_stat_activity, one per server process.
        self.application_name = f"ledger-service-listen {os.getpid()}"
        self.connected = asyncio.Event()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            await self._watcher.wanted.wait()
            try:
                conn = await self._db.connect(self.application_name)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.connected.set()
                    backoff = 0.1
                    # Commits made while we were not listening: wake everyone.
                    self._watcher.publish_all()
                    await self._deliver(conn)
                self.connected.clear()  # closed on purpose: nobody follows
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                log.warning("LISTEN connection lost (%s); streams poll meanwhile", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _deliver(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Publishes notifications until nothing has been followed for
        `linger` seconds (or the connection fails or goes silent)."""
        loop = asyncio.get_running_loop()
        unwanted_since: float | None = None
        check = min(self._probe_every, self._linger) or 0.01
        while True:
            heard = False
            async for note in conn.notifies(timeout=check):
                heard = True
                ledger, _, _ = note.payload.rpartition(":")
                self._watcher.publish(ledger)
            if not heard:
                await self._probe(conn)
            if self._watcher.wanted.is_set():
                unwanted_since = None
            elif unwanted_since is None:
                unwanted_since = loop.time()
            elif loop.time() - unwanted_since >= self._linger:
                return

    async def _probe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Raises if the connection does not answer within the bound."""
        with self._db.watching(conn) as watch:
            try:
                await conn.execute("SELECT 1")
            except psycopg.OperationalError:
                if not watch.fired:
                    raise
        if watch.fired:
            raise psycopg.OperationalError(f"{self._db.timeouts.no_answer()}: replacing it")
