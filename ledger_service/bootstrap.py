"""The composition root: builds everything the server runs from Settings."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from .api.errors import Guard
from .api.servicer import LedgerServicer, StreamSettings
from .auth.access import Gate
from .auth.principals import AuthFile
from .auth.quotas import FollowQuota
from .config import Settings
from .domain.limits import STREAM_MESSAGE_MAX_ENTRIES
from .observability.calls import Observability
from .observability.logs import CallLog
from .observability.metrics import NO_METRICS, Metrics, PrometheusMetrics
from .service import use_cases
from .service.group_commit import GroupCommitter
from .service.ports import Blocking, StoredRow, UowFactory
from .service.reads import Reads
from .service.writes import Writes
from .storage import dialect
from .storage.listener import PgListener
from .storage.loop_writer import LoopWriter
from .storage.probe import DatabaseProbe
from .storage.readiness import Readiness
from .storage.timeouts import DbTimeouts
from .storage.uow import SqlUnitOfWork, create_engine, normalize_url
from .streaming.tail import Tails
from .streaming.watch import HeadWatcher
from .tls import TlsFiles, peer_identities

T = TypeVar("T")

# Seconds a scrape of /metrics may wait for the consumers' lag.
CONSUMER_LAG_TIMEOUT = 2.0


@dataclass
class App:
    """What serve() runs; close() releases it after the last call."""

    servicer: LedgerServicer
    guard: Guard  # runs before every LedgerService call (api/errors.map_errors)
    auth_file: AuthFile | None  # None: auth is off
    readiness: Readiness
    listener: PgListener | None  # Postgres only, as are the writer and the probe
    probe: DatabaseProbe | None
    executor: ThreadPoolExecutor
    writer: LoopWriter | None
    dispose: Callable[[], None]  # the engine's pool
    observability: Observability  # metrics (NO_METRICS: off) and the call log

    async def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.writer is not None:
            await self.writer.close()
        if self.probe is not None:
            await self.probe.close()
        self.dispose()


def in_thread_pool(executor: ThreadPoolExecutor) -> Blocking:
    """run(fn, *args): `fn(*args)` in the database thread pool."""

    async def run(fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(fn, *args))

    return run


def build(settings: Settings, tls: TlsFiles | None = None) -> App:
    """Everything but the gRPC server. Checks the schema once (SchemaNotCurrent
    if the database is reachable and not migrated; if unreachable, the server
    serves anyway, refusing calls until it is reachable)."""
    auth_file = AuthFile(Path(settings.auth_file)) if settings.auth_file else None
    url = normalize_url(settings.database_url)
    timeouts = settings.db_timeouts()
    engine = create_engine(settings.database_url, pool_size=settings.pool_size, timeouts=timeouts)
    readiness = Readiness(engine)
    missing = _fail_if_missing(engine, url)
    try:
        readiness.check_schema()
    except BaseException:
        engine.dispose()
        raise
    finally:
        event.remove(engine, "handle_error", missing)
    postgres = url.get_backend_name() == dialect.POSTGRES
    uow: UowFactory = functools.partial(SqlUnitOfWork, engine, timeouts=timeouts)
    executor = ThreadPoolExecutor(settings.pool_size, thread_name_prefix="ledger-db")
    run = in_thread_pool(executor)
    writer = (
        LoopWriter(url, settings.pool_size, on_connection_lost=engine.dispose, timeouts=timeouts)
        if postgres
        else None
    )
    watcher = HeadWatcher()
    metrics: Metrics = PrometheusMetrics() if settings.metrics_listen else NO_METRICS
    reads, dispose_reads = _reads(settings, uow, run, timeouts)
    metrics.watch_consumers(
        lambda: use_cases.consumer_lags(functools.partial(uow, timeout=CONSUMER_LAG_TIMEOUT))
    )

    def dispose() -> None:
        engine.dispose()
        dispose_reads()

    return App(
        servicer=build_servicer(settings, uow, run, writer, watcher, metrics, reads),
        guard=guard(_gate(auth_file, tls), readiness),
        auth_file=auth_file,
        readiness=readiness,
        listener=PgListener(url, watcher, timeouts=timeouts) if postgres else None,
        probe=DatabaseProbe(url, timeouts=timeouts) if postgres else None,
        executor=executor,
        writer=writer,
        dispose=dispose,
        observability=Observability(metrics, CallLog(settings.slow_call_ms / 1000)),
    )


def _reads(
    settings: Settings, primary: UowFactory, run: Blocking, timeouts: DbTimeouts
) -> tuple[Reads, Callable[[], None]]:
    """The reads' database: the primary, or the hot standby of
    --read-database-url, and how to release its pool."""
    if not settings.read_database_url:
        return Reads(run, primary), lambda: None
    engine = create_engine(
        settings.read_database_url, pool_size=settings.pool_size, timeouts=timeouts
    )
    try:
        # Reachable and unmigrated: a standby of another database. Unreachable:
        # serve anyway (its reads fail UNAVAILABLE until it answers).
        Readiness(engine).check_schema()
    except BaseException:
        engine.dispose()
        raise
    standby: UowFactory = functools.partial(SqlUnitOfWork, engine, timeouts=timeouts)
    return Reads(run, standby, primary, replay_wait=settings.read_replay_wait), engine.dispose


class DatabaseMissing(ValueError):
    """The database named in the URL cannot exist as configured (not a
    passing outage): a start fails on it rather than serving refusals."""


def _fail_if_missing(engine: Engine, url: sa.URL) -> Callable[[Any], None]:
    """Makes a failed connect raise DatabaseMissing when the Postgres server
    answered that the database does not exist (3D000), or SQLite could not
    open its file; removed after the start's schema check, so that later
    failures stay outages. libpq gives no SQLSTATE for a failed connect,
    hence its (English) message: a localized server gets the outage path."""
    sqlite = url.get_backend_name() == dialect.SQLITE
    missing_text = f'database "{url.database}" does not exist'

    def check(context: Any) -> None:
        if context.connection is not None:  # a statement failed, not the connect
            return
        text = str(context.original_exception).strip()
        if sqlite or missing_text in text:
            where = url.render_as_string()  # hides a password
            first = text.splitlines()[0] if text else type(context.original_exception).__name__
            raise DatabaseMissing(f"cannot open database {where}: {first}")

    event.listen(engine, "handle_error", check)
    return check


def _gate(auth_file: AuthFile | None, tls: TlsFiles | None) -> Gate | None:
    if auth_file is None:
        return None
    if tls is not None and tls.client_ca is not None:  # mTLS: certificates name callers
        return Gate(auth_file, lambda context: peer_identities(context.auth_context()))
    return Gate(auth_file)


def guard(gate: Gate | None, readiness: Readiness) -> Guard:
    """Who may call first (deny by default), then whether the database is."""

    def check(method: str, request: Any, context: Any) -> None:
        if gate is not None:
            gate.check(method, request, context)
        readiness.require_ready()

    return check


def build_servicer(
    settings: Settings,
    uow: UowFactory,
    run: Blocking,
    writer: LoopWriter | None,
    watcher: HeadWatcher,
    metrics: Metrics = NO_METRICS,
    reads: Reads | None = None,
) -> LedgerServicer:
    """The servicer and what it uses, over a unit-of-work factory, the thread
    pool and (Postgres) the event-loop writer."""
    writes = Writes(uow, run, writer, published=watcher.publish, observe=metrics.written)
    reads = reads or Reads(run, uow)
    committer = (
        GroupCommitter(
            writes.group,
            max_pending=settings.max_pending_posts,
            max_wait=settings.group_commit_max_wait,
            on_batch=metrics.batch,
        )
        if settings.group_commit
        else None
    )

    async def read_tail(ledger: str, after: int, limit: int) -> tuple[list[StoredRow], int | None]:
        read = await run(use_cases.read_rows, reads.uow, ledger, after, limit)
        return read.rows, read.head

    tails = Tails(read_tail, watcher, poll_interval=settings.poll_interval, metrics=metrics)
    streams = StreamSettings(
        poll_interval=settings.poll_interval,
        heartbeat_interval=settings.heartbeat_interval,
        message_size=max(1, min(settings.stream_batch, STREAM_MESSAGE_MAX_ENTRIES)),
    )
    follows = FollowQuota(settings.max_follows_per_principal)
    return LedgerServicer(uow, run, writes, committer, tails, watcher, streams, follows, reads)
