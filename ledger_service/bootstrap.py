"""The composition root: builds everything the server runs from Settings."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .api.errors import Guard
from .api.servicer import LedgerServicer, StreamSettings
from .auth.access import Gate
from .auth.principals import AuthFile
from .auth.quotas import FollowQuota
from .config import Settings
from .domain.limits import STREAM_MESSAGE_MAX_ENTRIES
from .service import use_cases
from .service.group_commit import GroupCommitter
from .service.ports import Blocking, StoredRow, UowFactory
from .service.writes import Writes
from .storage import dialect
from .storage.listener import PgListener
from .storage.loop_writer import LoopWriter
from .storage.probe import DatabaseProbe
from .storage.readiness import Readiness
from .storage.uow import SqlUnitOfWork, create_engine, normalize_url
from .streaming.tail import Tails
from .streaming.watch import HeadWatcher
from .tls import TlsFiles, peer_identities

T = TypeVar("T")


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
    try:
        readiness.check_schema()
    except BaseException:
        engine.dispose()
        raise
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
    return App(
        servicer=build_servicer(settings, uow, run, writer, watcher),
        guard=guard(_gate(auth_file, tls), readiness),
        auth_file=auth_file,
        readiness=readiness,
        listener=PgListener(url, watcher, timeouts=timeouts) if postgres else None,
        probe=DatabaseProbe(url, timeouts=timeouts) if postgres else None,
        executor=executor,
        writer=writer,
        dispose=engine.dispose,
    )


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
) -> LedgerServicer:
    """The servicer and what it uses, over a unit-of-work factory, the thread
    pool and (Postgres) the event-loop writer."""
    writes = Writes(uow, run, writer, published=watcher.publish)
    committer = (
        GroupCommitter(
            writes.group,
            max_pending=settings.max_pending_posts,
            max_wait=settings.group_commit_max_wait,
        )
        if settings.group_commit
        else None
    )

    async def read_tail(ledger: str, after: int, limit: int) -> tuple[list[StoredRow], int | None]:
        read = await run(use_cases.read_rows, uow, ledger, after, limit)
        return read.rows, read.head

    tails = Tails(read_tail, watcher, poll_interval=settings.poll_interval)
    streams = StreamSettings(
        poll_interval=settings.poll_interval,
        heartbeat_interval=settings.heartbeat_interval,
        message_size=max(1, min(settings.stream_batch, STREAM_MESSAGE_MAX_ENTRIES)),
    )
    follows = FollowQuota(settings.max_follows_per_principal)
    return LedgerServicer(uow, run, writes, committer, tails, watcher, streams, follows)
