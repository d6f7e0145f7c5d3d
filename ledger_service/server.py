"""The grpc.aio server: LedgerService, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from . import bootstrap
from . import tls as tls_module
from .api.errors import map_errors
from .auth.principals import AuthFile
from .config import Settings, split_host_port
from .contract import reflection
from .observability.metrics import MetricsServer
from .storage.probe import DatabaseProbe
from .storage.readiness import Readiness, SchemaNotCurrent
from .storage.uow import normalize_url
from .tls import TlsFiles

log = logging.getLogger(__name__)

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name

# Seconds between two health checks of the database.
HEALTH_INTERVAL = 1.0
# Seconds between two looks at the auth file for a change.
AUTH_RELOAD_INTERVAL = 1.0
# Seconds between two looks, in worker mode, at whether the supervisor lives.
SUPERVISOR_CHECK_INTERVAL = 1.0

# Worker mode (ledger_service/workers.py): the supervisor sets these in each
# worker it starts: its index, and the pipe it writes "ready" to once it serves.
WORKER_INDEX_ENV = "LEDGER_WORKER_INDEX"
WORKER_READY_FD_ENV = "LEDGER_WORKER_READY_FD"


def worker_index() -> int | None:
    """This process's index among the supervisor's workers; None when it
    serves on its own. ValueError if the variable is not a number."""
    raw = os.environ.get(WORKER_INDEX_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{WORKER_INDEX_ENV}: not a whole number: {raw!r}")
    return int(raw)


def settle_startup_objects() -> None:
    """Moves everything made at startup (modules, descriptors, SQL, the
    pools) out of the cyclic garbage collector's view: a 1000-entry batch
    makes thousands of short-lived objects, and each full collection would
    rescan the whole heap of objects that live as long as the process."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Runs until SIGTERM/SIGINT (or `stop` is set), then drains."""
    try:
        worker = worker_index()
        tls = settings.tls_files()
        if tls is not None:
            tls_module.validate(tls)  # a bad file stops the start, named
        if worker is None:  # workers share the supervisor's port on purpose
            _check_free(settings.listen, "--listen")
        if settings.metrics_listen:
            _check_free(settings.metrics_listen, "--metrics-listen")
        _check_exposure(settings, tls)
        app = bootstrap.build(settings, tls)
    except ValueError as exc:  # the settings, an auth or TLS file, the database URL
        raise StartupError(str(exc)) from exc
    server = grpc.aio.server(options=server_options(settings))
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
        map_errors(app.servicer, guard=app.guard, observe=app.observability), server
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME])
    metrics_server = None
    try:
        port = (
            server.add_insecure_port(settings.listen)
            if tls is None
            else server.add_secure_port(settings.listen, tls_module.server_credentials(tls))
        )
        registry = app.observability.metrics.registry
        if settings.metrics_listen and registry is not None:
            metrics_host, metrics_port = split_host_port(settings.metrics_listen, "")
            metrics_server = MetricsServer(metrics_host, metrics_port, registry)
            where = _join(metrics_host, metrics_server.port)
            if worker is None:
                log.info("metrics at http://%s/metrics", where)
            else:
                log.info("worker %d metrics at http://%s/metrics", worker, where)
    except (RuntimeError, OSError) as exc:  # taken after _check_free looked, or refused
        await app.close()
        raise StartupError(f"cannot listen: {exc}") from exc
    host = settings.listen.rsplit(":", 1)[0]

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    auth_task = None
    if app.auth_file is not None:
        auth_file = app.auth_file
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, functools.partial(auth_file.reload, force=True))
        auth_task = asyncio.create_task(_watch_auth_file(auth_file), name="auth-file")

    listener_task = None
    if app.listener is not None:
        listener_task = asyncio.create_task(app.listener.run(), name="pg-listener")

    orphan_task = None
    if worker is not None:
        orphan_task = asyncio.create_task(_drain_if_orphaned(stop), name="supervisor-watch")

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
    if worker is None:
        # Tests and scripts wait for this exact line (it carries the real port).
        log.info("ledger-service listening on %s:%d (database %s)", host, port, database)
    else:
        # Not "listening on": the supervisor says that once every worker serves.
        pid = os.getpid()
        log.info(
            "worker %d (pid %d) serving on %s:%d (database %s)", worker, pid, host, port, database
        )
        _tell_supervisor_ready()

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
    for task in (listener_task, auth_task, orphan_task):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await app.close()
    if metrics_server is not None:
        await asyncio.to_thread(metrics_server.close)
    log.info("stopped")
    if fatal is not None:
        raise fatal


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC's channel arguments for the abuse limits (docs/security.md)."""
    ms = 1000
    return [
        # gRPC enables SO_REUSEPORT by default: a second server on the same
        # port would silently share it. Fail loudly instead, except for the
        # workers of one supervisor, which share its port on purpose.
        ("grpc.so_reuseport", 0 if worker_index() is None else 1),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # A client pinging more often than this gets GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval * ms)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * ms)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * ms)),
    ]


class StartupError(Exception):
    """The server cannot start as configured; the message says why."""


class InsecureListen(ValueError):
    """serve would expose every ledger, unauthenticated, beyond loopback."""


def _check_exposure(settings: Settings, tls: TlsFiles | None) -> None:
    """Secure by default: without an auth file, serve only on loopback
    (with a warning), unless --insecure says otherwise."""
    host = settings.listen.rsplit(":", 1)[0].strip("[]")
    loopback = host == "localhost" or _is_loopback_address(host)
    if settings.auth_file:
        if tls is None and not loopback:
            log.warning(
                "serving %s without TLS: bearer tokens cross the network in plaintext "
                "(--tls-cert and --tls-key turn TLS on)",
                settings.listen,
            )
        return
    if loopback:
        log.warning(
            "auth is off: anyone who reaches %s may call everything (loopback only; "
            "see docs/security.md to turn auth on)",
            settings.listen,
        )
        return
    if settings.insecure:
        log.warning(
            "auth is off (--insecure): anyone who reaches %s may call everything", settings.listen
        )
        return
    raise InsecureListen(
        f"refusing to serve {settings.listen} without auth: anyone who reaches it could post "
        "to and read every ledger. Give an auth file (--auth-file or LEDGER_AUTH_FILE; see "
        "docs/security.md), or pass --insecure to serve it open anyway"
    )


def _check_free(address: str, flag: str) -> None:
    """StartupError if `address` (host:port) cannot be listened on. gRPC
    would say so in a log line of its own and a generic error; binding
    first here names the cause in one line. One address of the host that
    binds is enough, as it is for gRPC."""
    host, port = split_host_port(address, flag)
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address} ({flag}): {exc.strerror}") from None
    problem: OSError | None = None
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                probe.bind(sockaddr)
                return
            except OSError as exc:
                problem = problem or exc
    reason = problem.strerror if problem is not None else "no address"
    raise StartupError(f"cannot listen on {address} ({flag}): {reason}")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or all addresses ("", 0.0.0.0)


def _tell_supervisor_ready() -> None:
    """Writes "ready" to the supervisor's pipe: a signal of its own, so that
    it does not depend on the log level or format."""
    raw = os.environ.pop(WORKER_READY_FD_ENV, "")
    if not raw.isdigit():
        return
    fd = int(raw)
    with contextlib.suppress(OSError):  # a supervisor gone: the orphan watch sees it
        os.write(fd, b"ready\n")
    with contextlib.suppress(OSError):
        os.close(fd)


async def _drain_if_orphaned(stop: asyncio.Event) -> None:
    """Drains the worker once its supervisor is gone (killed, say), so that
    no worker serves on unsupervised."""
    parent = os.getppid()
    while True:  # a poll: nothing wakes a process when its parent dies
        await asyncio.sleep(SUPERVISOR_CHECK_INTERVAL)
        if os.getppid() != parent:
            break
    log.warning("the supervisor (pid %d) is gone: draining", parent)
    stop.set()


async def _watch_auth_file(auth_file: AuthFile) -> None:
    """Re-reads the auth file when it changes (SIGHUP also forces it)."""
    while True:
        await asyncio.sleep(AUTH_RELOAD_INTERVAL)
        auth_file.reload()


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
