"""Postgres: the common write of entries, on the event loop.

Most writes are new entries: every idempotency key new, the counter there, no
total overflowing. Such a write is one statement in one round trip
(numbering.TAKE_AND_INSERT_PG, committed as it ends). Run here, on psycopg's
asyncio connection in the event loop's own thread, it spares each transaction
two thread hand-offs (to a database thread and back), each a wake-up of
another thread and a wait for the GIL on a server that is CPU-bound
(docs/performance.md).

Anything else is refused without writing anything (None): a key already
stored, no counter, an overflowing total. The careful path (service/
use_cases.py, in the thread pool) then looks the keys up and decides what the
caller hears.
Errors that are the database's own (unreachable, deadline) are raised as the
same domain errors the careful path raises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.pq import TransactionStatus

from ..domain.entries import NewEntry
from ..domain.errors import DeadlineExceeded, StorageUnavailable, check_deadline
from ..service.ports import TotalsOutOfRange
from .dialect import is_connection_lost
from .numbering import TAKE_AND_INSERT_PG, Numbered, numbered_from, statement_params
from .pg import lock_timeout
from .repository import movements_of
from .timeouts import DEFAULT_TIMEOUTS, AsyncConnections, DbTimeouts, abandoned_error
from .uow import APPLICATION_NAME, translate_error, unreachable
from .watchdog import WATCHDOG, Watchdog

Rows = list[tuple[Any, ...]]


class LoopWriter:
    """`await writer.add_new_entries(ledger, batch, time_left)` on one event
    loop; close() after the last write."""

    def __init__(
        self,
        url: sa.URL,
        max_connections: int,
        on_connection_lost: Callable[[], None] = lambda: None,
        *,
        timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
        watchdog: Watchdog = WATCHDOG,
    ) -> None:
        self._db = AsyncConnections(url, timeouts, watchdog)
        self._timeouts = timeouts
        # A lost connection usually means all are (a restart, a failover):
        # the idle ones are closed, and through this the thread pool's too,
        # else the next writes would each fail once more on a dead one.
        self._on_connection_lost = on_connection_lost
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(max_connections)  # binds to a loop on first use
        self._writes: set[asyncio.Task[Rows | None]] = set()  # may outlive their callers

    async def close(self) -> None:
        """Waits for the statements in flight (each bounded), then closes
        the idle connections."""
        if self._writes:
            await asyncio.wait(self._writes)
        await self._close_idle()

    async def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def add_new_entries(
        self, ledger: str, batch: Sequence[NewEntry], time_left: float | None
    ) -> Numbered | None:
        """Numbers and stores `batch` (one ledger, keys distinct) with the
        next len(batch) numbers and adds it to the account totals, committed
        in the same round trip; or, with nothing written and no number taken,
        None when the careful path must decide (see the module doc).
        `time_left`: seconds left of the callers' deadline (None: none); it
        bounds every lock wait of the statement, and the wait for its answer."""
        deadline = None if time_left is None else time.monotonic() + time_left
        try:
            moves = movements_of(ledger, batch)
        except TotalsOutOfRange:
            return None
        params, payloads = statement_params(
            ledger,
            batch,
            moves,
            lock_timeout=lock_timeout(self._timeouts.statement_time(time_left)),
        )
        # In a task of its own: a caller that goes away is answered at once,
        # and the statement ends by its own bounds, not by psycopg's cancel
        # request, which needs a new connection a failing network may refuse.
        write = asyncio.get_running_loop().create_task(self._write(params, time_left, deadline))
        self._writes.add(write)
        write.add_done_callback(self._written)
        rows = await asyncio.shield(write)
        # None: no counter, a key already stored, an overflowing total, a limit.
        return numbered_from(batch, payloads, moves, rows or [])

    def _written(self, write: asyncio.Task[Rows | None]) -> None:
        self._writes.discard(write)
        if not write.cancelled():
            write.exception()  # retrieved: a caller that went away has no use for it

    async def _write(
        self, params: Mapping[str, Any], time_left: float | None, deadline: float | None
    ) -> Rows | None:
        """The statement's rows; None if it wrote nothing for a reason of the
        batch's own (a key already stored, an overflowing total)."""
        conn = await self._checkout(time_left)
        keep = True  # unless it is lost; and only if it ended idle
        try:
            check_deadline(deadline)
            error: psycopg.Error | None = None
            with self._db.watching(conn, time_left) as watch:
                try:
                    cursor = await conn.execute(TAKE_AND_INSERT_PG, params)
                    rows = await cursor.fetchall()
                except psycopg.Error as exc:
                    error = exc
            if watch.fired:  # cut off: the connection is gone, and maybe all are
                keep = False
                await self._lost()
                if error is not None:
                    raise abandoned_error(deadline, self._timeouts) from error
                return rows  # its answer had come in just before
            if error is None:
                return rows
            if is_connection_lost(error):
                keep = False
                await self._lost()
                raise translate_error(error) from error
            # The statement's own error: the connection is fine.
            if isinstance(error, psycopg.IntegrityError | psycopg.errors.NumericValueOutOfRange):
                return None  # nothing written: the careful path decides
            translated = translate_error(error)
            if translated is error:
                raise error
            raise translated from error
        finally:
            if keep and not conn.broken and conn.info.transaction_status == _IDLE:
                self._idle.append(conn)
            else:
                await conn.close()
            self._slots.release()

    async def _checkout(self, time_left: float | None) -> psycopg.AsyncConnection[Any]:
        """An idle connection, or a new one, holding a slot. Connecting
        happens here, in the caller's time, so a database that refuses
        connections fails the write at once (UNAVAILABLE), as the thread
        pool's engine does, instead of making it wait for a background
        reconnect (which is why this is not psycopg_pool)."""
        wait = self._timeouts.statement_time(time_left)
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            if time_left is not None and wait >= time_left:
                raise DeadlineExceeded(
                    "deadline exceeded waiting for a database connection; nothing was written"
                ) from None
            raise StorageUnavailable(
                f"no database connection came free within {wait:g}s; nothing was written"
            ) from None
        if self._idle:
            return self._idle.pop()
        try:
            return await self._db.connect(APPLICATION_NAME)
        except psycopg.Error as exc:
            self._slots.release()
            raise unreachable(exc) from exc
        except BaseException:
            self._slots.release()
            raise

    async def _lost(self) -> None:
        await self._close_idle()
        self._on_connection_lost()


_IDLE = TransactionStatus.IDLE
