"""The process's LISTEN connection: commits of every server process, as
Postgres notifies them, wake this process's followers (streaming/watch.py)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import psycopg
import sqlalchemy as sa

from ..streaming.watch import HeadWatcher
from .dialect import NOTIFY_CHANNEL
from .timeouts import DEFAULT_TIMEOUTS, AsyncConnections, DbTimeouts
from .watchdog import WATCHDOG, Watchdog

log = logging.getLogger(__name__)


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
                ledger, _, head = note.payload.rpartition(":")
                self._watcher.publish(ledger, int(head) if head.isdigit() else 0)
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
        try:
            with self._db.watching(conn) as watch:
                await conn.execute("SELECT 1")
        except psycopg.OperationalError:
            if not watch.fired:
                raise
        if watch.fired:
            raise psycopg.OperationalError(f"{self._db.timeouts.no_answer()}: replacing it")
