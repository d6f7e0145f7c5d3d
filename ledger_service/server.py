"""The grpc.aio server: LedgerService, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ledger.v1 import ledger_pb2, ledger_pb2_grpc
from sqlalchemy.engine import Engine

from .api.errors import map_errors
from .api.servicer import LedgerServicer, StreamSettings
from .config import Settings
from .domain import STREAM_MESSAGE_MAX_ENTRIES, StorageUnavailable
from .storage import dialect, migrate
from .storage.loop_writer import LoopWriter
from .storage.probe import DatabaseProbe
from .storage.uow import UnitOfWork, create_engine, normalize_url, unreachable
from .watch import HeadWatcher, PgListener

log = logging.getLogger(__name__)

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name


class SchemaNotCurrent(RuntimeError):
    pass


def settle_startup_objects() -> None:
    """Moves everything made at startup (modules, descriptors, SQL, the
    pools) out of the cyclic garbage collector's view.

    A 1000-entry batch makes thousands of short-lived objects, which trigger
    collections; each full one rescanned the whole heap of startup objects
    that live as long as the process: ~30% of the server's CPU under
    PostEntries load (py-spy --native), 104k -> 125-132k entries/s once frozen.
    """
    gc.collect()
    gc.freeze()


# Seconds between two health checks of the database.
HEALTH_INTERVAL = 1.0


class _Database:
    """What the server knows of its database: whether the schema has been
    checked (calls are refused until it has been), and the last problem."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ready = False
        self.problem: str | None = None

    def check_schema(self) -> None:
        """Sets `ready` if the database is reachable and migrated; raises
        SchemaNotCurrent if it is reachable but not migrated."""
        try:
            current = migrate.is_current(self.engine)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            self.problem = unreachable(exc).message
            return
        if not current:
            url = self.engine.url.render_as_string()
            raise SchemaNotCurrent(f"database {url} is not migrated: run `ledger-service migrate`")
        self.ready = True
        self.problem = None

    def require_ready(self) -> None:
        if not self.ready:
            raise StorageUnavailable(
                f"the server has not reached its database yet ({self.problem}); retry"
            )


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Runs until SIGTERM/SIGINT (or `stop` is set), then drains."""
    url = normalize_url(settings.database_url)
    timeouts = settings.db_timeouts()
    engine = create_engine(settings.database_url, pool_size=settings.pool_size, timeouts=timeouts)
    database = _Database(engine)
    try:
        # Unreachable (not started yet, at max_connections): serve anyway,
        # refusing calls with UNAVAILABLE until it is reachable.
        database.check_schema()
    except SchemaNotCurrent:
        engine.dispose()
        raise
    postgres = url.get_backend_name() == dialect.POSTGRES
    executor = ThreadPoolExecutor(settings.pool_size, thread_name_prefix="ledger-db")
    writer = None
    if postgres:
        writer = LoopWriter(
            url, settings.pool_size, on_connection_lost=engine.dispose, timeouts=timeouts
        )
    watcher = HeadWatcher()
    servicer = LedgerServicer(
        functools.partial(UnitOfWork, engine, timeouts=timeouts),
        executor,
        watcher,
        StreamSettings(
            poll_interval=settings.poll_interval,
            heartbeat_interval=settings.heartbeat_interval,
            page_size=max(1, min(settings.stream_batch, STREAM_MESSAGE_MAX_ENTRIES)),
        ),
        group_commit=settings.group_commit,
        max_pending_posts=settings.max_pending_posts,
        group_commit_max_wait=settings.group_commit_max_wait,
        writer=writer,
    )
    server = grpc.aio.server(
        # gRPC enables SO_REUSEPORT by default: a second server on the same
        # port would silently share it. Fail loudly instead.
        options=[("grpc.so_reuseport", 0)],
    )
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
        map_errors(servicer, guard=database.require_ready), server
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(settings.listen)
    host = settings.listen.rsplit(":", 1)[0]

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    listener_task = None
    if postgres:
        listener = PgListener(url, watcher, timeouts=timeouts)
        listener_task = asyncio.create_task(listener.run(), name="pg-listener")

    await server.start()
    settle_startup_objects()
    # "": the process serves (liveness). The service: it can reach its
    # database (readiness; what a load balancer should check).
    status = health_pb2.HealthCheckResponse
    await health_servicer.set("", status.SERVING)
    # As of the schema check just made; the probe keeps it current.
    await health_servicer.set(
        SERVICE_NAME, status.SERVING if database.ready else status.NOT_SERVING
    )
    probe = DatabaseProbe(url, timeouts=timeouts) if postgres else None
    # Ends only by raising SchemaNotCurrent: a database reached late, unmigrated.
    health_task = asyncio.create_task(
        _report_health(database, probe, health_servicer), name="health"
    )
    # Tests and scripts wait for this exact line (it carries the real port).
    log.info("ledger-service listening on %s:%d (database %s)", host, port, url.render_as_string())

    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({stopping, health_task}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    health_task.cancel()
    fatal = None
    try:
        await health_task
    except asyncio.CancelledError:
        pass
    except SchemaNotCurrent as exc:
        log.error("%s", exc)
        fatal = exc
    log.info("shutting down: draining calls for up to %.1fs", settings.shutdown_grace)
    await health_servicer.enter_graceful_shutdown()
    servicer.begin_shutdown()
    await server.stop(settings.shutdown_grace)
    if listener_task is not None:
        listener_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener_task
    executor.shutdown(wait=True)
    if writer is not None:
        await writer.close()
    if probe is not None:
        await probe.close()
    engine.dispose()
    log.info("stopped")
    if fatal is not None:
        raise fatal


async def _report_health(
    database: _Database, probe: DatabaseProbe | None, health_servicer: Any
) -> None:
    """Sets the service's health from the database's answers, every
    HEALTH_INTERVAL seconds: SERVING while it answers, NOT_SERVING while it
    does not (or before its schema could be checked)."""
    serving = database.ready
    while True:
        if not database.ready:
            await asyncio.to_thread(database.check_schema)
        problem = database.problem
        if database.ready and probe is not None:
            problem = await probe.check()
        if (problem is None) != serving:
            serving = problem is None
            if serving:
                log.info("the database answers: %s is SERVING", SERVICE_NAME)
            else:
                log.warning("%s is NOT_SERVING: %s", SERVICE_NAME, problem)
            status = health_pb2.HealthCheckResponse
            await health_servicer.set(
                SERVICE_NAME, status.SERVING if serving else status.NOT_SERVING
            )
        await asyncio.sleep(HEALTH_INTERVAL)
