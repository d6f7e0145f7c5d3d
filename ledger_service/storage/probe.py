"""Whether the database answers, asked on a connection of the probe's own:
what the server's health service reports (server.py)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import sqlalchemy as sa

from .timeouts import DEFAULT_TIMEOUTS, DbTimeouts, libpq_conninfo
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
        self._conninfo = libpq_conninfo(url, timeouts)
        self._timeouts = timeouts
        self._watchdog = watchdog
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.application_name = f"ledger-service-health {os.getpid()}"

    async def check(self) -> str | None:
        try:
            if self._conn is None:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=self.application_name
                )
        except psycopg.Error as exc:
            return unreachable(exc).message
        conn = self._conn
        problem = None
        if conn.broken or conn.closed:
            await self.close()
            return "the connection to the database was lost"
        try:
            with self._watchdog.watching(conn.pgconn.socket, self._timeouts.abandon_at(None)) as w:
                await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            problem = unreachable(exc).message
            if w.fired:
                problem = f"the database gave no answer within {self._timeouts.answer:g}s"
        if problem is not None or w.fired:  # a cut socket is gone even if it answered
            await self.close()
        return problem

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
