"""The bounds on every wait for the database, and the connection parameters
that carry them to libpq: every connection of the server (pool, loop writer,
listener, health probe) and of the bench is made with them."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa

from ..domain.errors import DeadlineExceeded, LedgerError, StorageUnavailable
from .watchdog import WATCHDOG, Watch, Watchdog

# Past a statement's bound the watchdog closes its connection. The grace lets
# the database's own answer to a bound it enforces (lock_timeout) arrive
# first, so a healthy connection is not closed for being exactly on time.
ABANDON_GRACE = 1.0


@dataclass(frozen=True)
class DbTimeouts:
    """`answer`: seconds a connection may take to connect, or to answer one
    statement, before it is abandoned (closed, never reused). Callers with
    an earlier deadline have their statements abandoned at that deadline.
    `tcp`: seconds after which the kernel drops a connection whose peer has
    stopped acknowledging (keepalives and tcp_user_timeout); 0 leaves the
    kernel's defaults (about 15 minutes for unacknowledged data)."""

    answer: float = 10.0
    tcp: float = 10.0

    def __post_init__(self) -> None:
        if self.answer <= 0:
            raise ValueError("the database answer timeout must be > 0 seconds")
        if self.tcp < 0:
            raise ValueError("the database TCP timeout must be >= 0 seconds (0: kernel defaults)")

    def libpq_params(self) -> dict[str, str]:
        """libpq connection parameters for these bounds."""
        # libpq takes whole seconds and treats 1 as 2.
        params = {"connect_timeout": str(max(2, math.ceil(self.answer)))}
        if self.tcp:
            # Probes start after half the time of silence and fill the rest.
            idle = max(1, int(self.tcp / 2))
            interval = max(1, int((self.tcp - idle) / 3))
            params |= {
                "keepalives": "1",
                "keepalives_idle": str(idle),
                "keepalives_interval": str(interval),
                "keepalives_count": str(max(1, int((self.tcp - idle) / interval))),
                "tcp_user_timeout": str(int(self.tcp * 1000)),
            }
        return params

    def statement_time(self, time_left: float | None) -> float:
        """Seconds a statement may take: the callers' time left, at most `answer`."""
        return self.answer if time_left is None else min(time_left, self.answer)

    def abandon_at(self, time_left: float | None) -> float:
        """The time.monotonic() at which a wait that starts now is abandoned."""
        return time.monotonic() + self.statement_time(time_left) + ABANDON_GRACE

    def no_answer(self) -> str:
        return f"the database gave no answer within {self.answer:g}s"


DEFAULT_TIMEOUTS = DbTimeouts()


def connection_params(url: sa.URL, timeouts: DbTimeouts) -> dict[str, str]:
    """The bounds' libpq parameters that the URL does not set itself (an
    operator's explicit `?keepalives_idle=...` wins)."""
    return {k: v for k, v in timeouts.libpq_params().items() if k not in url.query}


def libpq_conninfo(url: sa.URL, timeouts: DbTimeouts = DEFAULT_TIMEOUTS) -> str:
    """The URL as psycopg itself takes it (without SQLAlchemy's "+psycopg"),
    with the bounds' connection parameters."""
    bounded = url.set(drivername="postgresql").update_query_dict(connection_params(url, timeouts))
    return bounded.render_as_string(hide_password=False)


def abandoned_error(deadline: float | None, timeouts: DbTimeouts) -> LedgerError:
    """What the callers of an abandoned statement hear (deadline: theirs, a
    time.monotonic() value, None for none)."""
    unknown = (
        "its outcome is unknown: retry with the same idempotency key (a retry never posts twice)"
    )
    if deadline is not None and time.monotonic() >= deadline:
        return DeadlineExceeded(f"deadline exceeded: the database gave no answer; {unknown}")
    return StorageUnavailable(f"{timeouts.no_answer()}, so its connection was closed; {unknown}")


class AsyncConnections:
    """The server's own asyncio connections to Postgres (the loop writer's,
    the listener's, the probe's): autocommit, made with the bounds, and
    their waits watched."""

    def __init__(
        self, url: sa.URL, timeouts: DbTimeouts = DEFAULT_TIMEOUTS, watchdog: Watchdog = WATCHDOG
    ) -> None:
        self.timeouts = timeouts
        self._conninfo = libpq_conninfo(url, timeouts)
        self._watchdog = watchdog

    async def connect(self, application_name: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, application_name=application_name
        )

    def watching(
        self, conn: psycopg.AsyncConnection[Any], time_left: float | None = None
    ) -> contextlib.AbstractContextManager[Watch]:
        """Watches a wait on `conn` that may take the callers' `time_left`
        (at most the answer timeout)."""
        return self._watchdog.watching(conn.pgconn.socket, self.timeouts.abandon_at(time_left))
