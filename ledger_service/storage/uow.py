"""Engine construction and the unit of work (one transaction, rolled back
unless committed explicitly)."""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ..domain.errors import DeadlineExceeded, StorageUnavailable, check_deadline
from . import dialect, pg
from .repository import SqlLedgerRepository
from .timeouts import DEFAULT_TIMEOUTS, DbTimeouts, abandoned_error, connection_params
from .watchdog import WATCHDOG, Watch, Watchdog

log = logging.getLogger(__name__)

# How long a SQLite writer waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_MS = 30_000


_IDLE = TransactionStatus.IDLE

# Names this service's connections in pg_stat_activity.
APPLICATION_NAME = "ledger-service"


def normalize_url(url: str) -> sa.URL:
    """Accepts plain `postgresql://` / `postgres://` URLs and uses psycopg 3."""
    parsed = sa.make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine(
    url: str, *, pool_size: int = 10, timeouts: DbTimeouts = DEFAULT_TIMEOUTS
) -> Engine:
    parsed = normalize_url(url)
    if parsed.get_backend_name() == dialect.SQLITE:
        engine = sa.create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=0,
            hide_parameters=True,  # statement parameters are entry contents
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() != dialect.POSTGRES:
        raise ValueError(
            f"unsupported database {parsed.get_backend_name()!r}: use postgresql or sqlite"
        )
    # No pool_pre_ping: it would add a round trip to every request. A dead
    # connection fails its request with UNAVAILABLE (retryable with the same
    # idempotency key) and SQLAlchemy then replaces the pool's connections.
    return sa.create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeouts.answer,
        hide_parameters=True,  # errors and logs never carry entry contents
        connect_args={"application_name": APPLICATION_NAME, **connection_params(parsed, timeouts)},
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN itself, so writers can
        # take the write lock up front (BEGIN IMMEDIATE): no lock upgrade, no
        # SQLITE_BUSY deadlock between two readers turning writers.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class SqlUnitOfWork:
    """service.ports.UnitOfWork on a SQLAlchemy engine:
    `with SqlUnitOfWork(engine, write=True) as uow: ...; uow.commit()`.

    Database errors leave it as domain errors: connection trouble as
    StorageUnavailable (retryable), a statement timeout as DeadlineExceeded.
    On Postgres the connection is watched: if the database gives no answer
    within the callers' time (at most `timeouts.answer`), the connection is
    closed under the waiting statement, and the engine's pool, whose other
    connections may be as silent, is reset.
    """

    ledger: SqlLedgerRepository

    def __init__(
        self,
        engine: Engine,
        *,
        write: bool = False,
        timeout: float | None = None,
        timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
        watchdog: Watchdog = WATCHDOG,
    ):
        self._engine = engine
        self._write = write
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeouts = timeouts
        self._watchdog = watchdog
        self._conn: Connection | None = None
        self._raw: psycopg.Connection[Any] | None = None  # Postgres: the driver's connection
        self._watch: Watch | None = None
        self._tx: pg.WriteTransaction | None = None  # Postgres writes
        self._committed = False

    def __enter__(self) -> SqlUnitOfWork:
        try:
            conn = self._engine.connect()
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:  # refused, or the pool is full
            raise unreachable(exc) from exc
        self._conn = conn
        try:
            if conn.dialect.name != dialect.POSTGRES:
                if self._write:
                    conn.execution_options(sqlite_begin="IMMEDIATE")
                conn.begin()
            else:
                # Postgres, autocommit: every statement (a read, creating a
                # counter, the write of entries) is its own transaction and
                # snapshot, with no BEGIN/COMMIT round trips (pg.py).
                conn.execution_options(isolation_level="AUTOCOMMIT")
                self._raw = pg.driver(conn)
                self._watch = self._watchdog.start(
                    self._raw.pgconn.socket, self._timeouts.abandon_at(self._timeout)
                )
                if self._write:
                    bound = self._timeouts.statement_time(self._timeout)
                    self._tx = pg.WriteTransaction(self._raw, bound, self._check_deadline)
        except BaseException as exc:
            self._release(conn, self._end_watch())
            self._conn = None
            raise translate_error(exc) from exc
        self.ledger = SqlLedgerRepository(conn, self._tx)
        return self

    def _check_deadline(self) -> None:
        check_deadline(self._deadline)

    def commit(self) -> None:
        assert self._conn is not None
        if self._tx is None:
            self._check_deadline()
            self._conn.commit()
        # Postgres: the write, if any, committed with its statement
        # (WriteTransaction); single statements committed by themselves.
        self._committed = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        abandoned = self._end_watch()
        if conn is not None:
            try:
                # SQLite's open transaction. (On Postgres every statement,
                # the write included, is its own transaction: none is open.)
                if not self._committed and self._raw is None:
                    conn.rollback()
            except sa.exc.DBAPIError:
                log.debug("rollback failed", exc_info=True)
            finally:
                self._release(conn, abandoned)
        if abandoned:
            self._engine.dispose()
            if exc is not None:
                raise abandoned_error(self._deadline, self._timeouts) from exc
        if exc is not None:
            translated = translate_error(exc)
            if translated is not exc:
                raise translated from exc

    def _end_watch(self) -> bool:
        """Stops watching the connection; True if it was cut off."""
        watch, self._watch = self._watch, None
        return watch is not None and self._watchdog.end(watch)

    def _release(self, conn: Connection, abandoned: bool = False) -> None:
        # SQLAlchemy did not see errors raised on the driver's connection: one
        # that broke, was cut off, or was left mid-command (a reset does that)
        # is discarded here, else the pool's reset fails on it, or the pool
        # hands it out again.
        raw = self._raw
        if abandoned or (
            raw is not None and (raw.broken or raw.closed or raw.info.transaction_status != _IDLE)
        ):
            conn.invalidate()
        conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


# One warning per distinct database failure per this many seconds: an outage
# fails every call, and the log should say why without repeating it for each.
_WARN_EVERY = 10.0
_warned: dict[str, float] = {}


def _warn(reason: str) -> None:
    now = time.monotonic()
    if now - _warned.get(reason, -_WARN_EVERY) >= _WARN_EVERY:
        if len(_warned) > 100:
            _warned.clear()
        _warned[reason] = now
        log.warning("database unavailable: %s", reason)


def _reason(exc: BaseException) -> str:
    state = dialect.sqlstate(exc)
    return _first_line(exc) + ("" if state is None else f" (SQLSTATE {state})")


_RETRY = "retry with the same idempotency key (a retry never posts twice)"


def unreachable(exc: BaseException) -> StorageUnavailable:
    """A connection that could not be opened, whatever the reason (refused,
    too many clients, shutting down): the caller may retry later."""
    reason = _reason(exc)
    _warn(reason)
    return StorageUnavailable(f"database unreachable: {reason}; {_RETRY}")


def translate_error(exc: BaseException) -> BaseException:
    """A database error as the domain error the caller hears (itself if none)."""
    if dialect.is_query_canceled(exc):
        return DeadlineExceeded(
            "deadline exceeded while waiting for the database; nothing was written"
        )
    if dialect.is_unavailable(exc):
        reason = _reason(exc)
        _warn(reason)
        return StorageUnavailable(f"database unavailable: {reason}; {_RETRY}")
    return exc
