"""The grpc.aio server: LedgerService, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from . import bootstrap
from .api.errors import map_errors
from .config import Settings
from .storage.probe import DatabaseProbe
from .storage.readiness import Readiness, SchemaNotCurrent
from .storage.uow import normalize_url

log = logging.getLogger(__name__)

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name

# Seconds between two health checks of the database.
HEALTH_INTERVAL = 1.0


def settle_startup_objects() -> None:
    """Moves everything made at startup (modules, descriptors, SQL, the
    pools) out of the cyclic garbage collector's view: a 1000-entry batch
    makes thousands of short-lived objects, and each full collection would
    rescan the whole heap of objects that live as long as the process."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Runs until SIGTERM/SIGINT (or `stop` is set), then drains."""
    app = bootstrap.build(settings)
    server = grpc.aio.server(
        # gRPC enables SO_REUSEPORT by default: a second server on the same
        # port would silently share it. Fail loudly instead.
        options=[("grpc.so_reuseport", 0)],
    )
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
        map_errors(app.servicer, guard=app.readiness.require_ready), server
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
    if app.listener is not None:
        listener_task = asyncio.create_task(app.listener.run(), name="pg-listener")

    await server.start()
    settle_startup_objects()
    # "": the process serves (liveness). The service: it can reach its
    # database (readiness; what a load balancer should check).
    status = health_pb2.HealthCheckResponse
    await health_servicer.set("", status.SERVING)
    # As of the schema check just made; the probe keeps it current.
    await health_servicer.set(
        SERVICE_NAME, status.SERVING if app.readiness.ready else status.NOT_SERVING
    )
    # Ends only by raising SchemaNotCurrent: a database reached late, unmigrated.
    health_task = asyncio.create_task(
        _report_health(app.readiness, app.probe, health_servicer), name="health"
    )
    database = normalize_url(settings.database_url).render_as_string()
    # Tests and scripts wait for this exact line (it carries the real port).
    log.info("ledger-service listening on %s:%d (database %s)", host, port, database)

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
    app.servicer.begin_shutdown()
    await server.stop(settings.shutdown_grace)
    if listener_task is not None:
        listener_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener_task
    await app.close()
    log.info("stopped")
    if fatal is not None:
        raise fatal


async def _report_health(
    readiness: Readiness, probe: DatabaseProbe | None, health_servicer: Any
) -> None:
    """Sets the service's health from the database's answers, every
    HEALTH_INTERVAL seconds: SERVING while it answers, NOT_SERVING while it
    does not (or before its schema could be checked)."""
    serving = readiness.ready
    while True:
        if not readiness.ready:
            await asyncio.to_thread(readiness.check_schema)
        problem = readiness.problem
        if readiness.ready and probe is not None:
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
