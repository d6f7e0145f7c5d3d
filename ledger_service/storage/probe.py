"""Whether the database answers, asked on a connection of the probe's own:
what the server's health service reports (server.py)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import sqlalchemy as sa

from .timeouts import DEFAULT_TIMEOUTS, AsyncConnections, DbTimeouts
from .uow import unreachable
from .watchdog import WATCHDOG, Watchdog


class DatabaseProbe:
    """`await probe.check()`: None when the database answered a `SELECT 1`
    within the answer bound, else why not. The connection is kept between
    checks (so a database at max_connections, whose open connections still
    work, is not reported down) and replaced after a failure."""

    def __init__(
        self,
        url: sa.URL,
        *,
        timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
        watchdog: Watchdog = WATCHDOG,
    ) -> None:
        self._db = AsyncConnections(url, timeouts, watchdog)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.application_name = f"ledger-service-health {os.getpid()}"

    async def check(self) -> str | None:
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            await self.close()
        if self._conn is None:
            try:
                self._conn = await self._db.connect(self.application_name)
            except psycopg.Error as exc:
                return unreachable(exc).message
        conn = self._conn
        problem = None
        try:
            with self._db.watching(conn) as watch:
                await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            problem = self._db.timeouts.no_answer() if watch.fired else unreachable(exc).message
        if problem is not None or watch.fired:  # a cut socket is gone even if it answered
            await self.close()
        return problem

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
