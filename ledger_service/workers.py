"""`serve --workers N`: a supervisor that runs N server processes on one port
and replaces any that dies. It builds no app and opens no database itself.

Port: the supervisor binds the listen address with SO_REUSEPORT (a free port
for port 0) and keeps that socket bound, never listening, for as long as it
runs, so every worker and every replacement serves the same real port. The
workers (`python -m ledger_service serve` with the same arguments and
environment, `--listen HOST:PORT --workers 1` and LEDGER_WORKER_INDEX=i)
listen on it with SO_REUSEPORT, and the kernel spreads new connections over
them. Each worker groups its own posts; numbering holds across them through
the database's counter row, as it does across any server processes.

Metrics: with `--metrics-listen HOST:P`, worker i serves its metrics on
HOST:P+i (P = 0: each worker a free port); each logs `worker i metrics at
http://HOST:PORT/metrics`. A restarted worker i takes P+i again.

Logs: every line of a worker is relayed as is to the supervisor's stderr
(during the first start, held until that worker serves). A worker logs
`worker i (pid X) serving on HOST:PORT`, never "listening on"; the
supervisor logs `ledger-service listening on HOST:PORT (database ...,
N workers)` once all N serve (workers tell it on a pipe of their own, so
this does not depend on the log level or format).

Health: each worker serves grpc.health.v1 on its own connections, as a
single server does; a draining worker reports NOT_SERVING. A dead worker's
socket leaves the port's group, so the kernel stops routing connections to
it; the supervisor replaces it, logging a warning with how many of the N
serve meanwhile and an info line when all N serve again.

Restarts: a worker that exits (any code or signal) is restarted after 0.1 s,
doubling to at most 5 s; back to 0.1 s once a worker has served 10 s. A
worker that exits before it ever served, during the first start (a database
that does not exist, a bad TLS file), stops the others and the supervisor
exits with its exit code: only that worker's lines are shown, so the cause
stays one line. A worker whose supervisor is gone drains and exits.

Signals: SIGTERM or SIGINT is forwarded to every worker as SIGTERM; each
drains within --shutdown-grace (plus STOP_MARGIN, then SIGKILL) and the
supervisor exits 0. SIGHUP is forwarded to the serving workers, which
re-read the auth file (without one, it is ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import Settings, split_host_port
from .server import WORKER_INDEX_ENV, WORKER_READY_FD_ENV, StartupError, _check_free
from .storage.uow import normalize_url

log = logging.getLogger(__name__)

# Seconds before a restart: the first, the most (doubling in between), and
# how long a worker must have served for the next restart to be quick again.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
BACKOFF_RESET_AFTER = 10.0
# Seconds a stopping worker gets beyond --shutdown-grace before SIGKILL.
STOP_MARGIN = 5.0
# Seconds to wait for a dead worker's last lines and ready pipe to end.
DRAIN_TIMEOUT = 5.0
# Longest line of a worker read at once; a longer one is relayed in pieces.
LINE_LIMIT = 1 << 20


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Runs settings.worker_count() workers of `argv` (the `serve` command
    line) until SIGTERM/SIGINT; returns the exit status."""
    return asyncio.run(Supervisor(settings, argv).run())


def reserve_port(address: str) -> socket.socket:
    """A socket bound to `address` (host:port) with SO_REUSEPORT, not
    listening: it holds the port, a free one for port 0, for the workers.
    StartupError in one line if the port is taken or the host unknown."""
    host, port = split_host_port(address, "--listen")
    if port:
        _check_free(address, "--listen")  # without SO_REUSEPORT: taken is taken
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address} (--listen): {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {address} (--listen): {exc.strerror}") from None
    return sock


def worker_argv(argv: Sequence[str], replace: dict[str, str]) -> list[str]:
    """`argv` without the flags of `replace` (`--flag value` or `--flag=value`),
    then those flags with their new values: the last of a flag wins, so an
    abbreviation left in `argv` is overridden too."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, equals, _ = arg.partition("=")
        if name in replace:
            skip = not equals
            continue
        kept.append(arg)
    for name, value in replace.items():
        kept += [name, value]
    return kept


def describe_exit(code: int) -> str:
    """How a worker ended: "exited with code 1", "was killed by SIGKILL"."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


@dataclass
class _Slot:
    """Worker i: its current process, since when it serves, and its output
    held back until it serves during the first start (None: relayed)."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    serving_since: float | None = None
    held: list[bytes] | None = field(default_factory=list)
    muted: bool = False


class Supervisor:
    """Starts the workers, relays their output, restarts them, stops them."""

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.count = settings.worker_count()
        self._host = settings.listen.rpartition(":")[0]  # as given: "[::1]" stays bracketed
        self._port = 0
        self._slots = [_Slot(i) for i in range(self.count)]
        self._halt = asyncio.Event()  # SIGTERM/SIGINT, or a failed first start
        self._all_serving = asyncio.Event()  # the first start is over
        self._exit_code = 0

    async def run(self) -> int:
        metrics = [self._metrics_address(i) for i in range(self.count)]  # checked first
        with reserve_port(self.settings.listen) as reservation:
            self._port = reservation.getsockname()[1]
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._halt.set)
            loop.add_signal_handler(signal.SIGHUP, self._forward_hangup)
            tasks = [
                asyncio.create_task(self._keep(slot, metrics[slot.index]), name=f"worker-{i}")
                for i, slot in enumerate(self._slots)
            ]
            serving = asyncio.create_task(self._all_serving.wait())
            halted = asyncio.create_task(self._halt.wait())
            await asyncio.wait({serving, halted}, return_when=asyncio.FIRST_COMPLETED)
            if not self._halt.is_set():
                database = normalize_url(self.settings.database_url).render_as_string()
                # Tests and scripts wait for this line, as for a single server's.
                log.info(
                    "ledger-service listening on %s:%d (database %s, %d workers)",
                    self._host,
                    self._port,
                    database,
                    self.count,
                )
            await halted
            serving.cancel()
            await self._stop_all(tasks)
        return self._exit_code

    def _metrics_address(self, index: int) -> str | None:
        """Worker `index`'s --metrics-listen: port P+index (0 stays 0)."""
        if not self.settings.metrics_listen:
            return None
        host = self.settings.metrics_listen.rpartition(":")[0]
        _, port = split_host_port(self.settings.metrics_listen, "--metrics-listen")
        if port and port + self.count - 1 > 65535:
            raise StartupError(
                f"--metrics-listen: {self.count} workers need ports {port}-"
                f"{port + self.count - 1}, beyond 65535"
            )
        return f"{host}:{port + index if port else 0}"

    def _command(self, index: int, metrics: str | None) -> list[str]:
        replace = {"--listen": f"{self._host}:{self._port}", "--workers": "1"}
        if metrics is not None:
            replace["--metrics-listen"] = metrics
        return [sys.executable, "-m", "ledger_service", *worker_argv(self.argv, replace)]

    async def _keep(self, slot: _Slot, metrics: str | None) -> None:
        """Runs worker `slot.index` again and again until the supervisor halts."""
        backoff = BACKOFF_FIRST
        try:
            while not self._halt.is_set():
                code, served = await self._run_once(slot, metrics)
                if self._halt.is_set():
                    return
                if served is None and not self._all_serving.is_set():
                    self._fail_start(slot, code)
                    return
                if served is not None and served >= BACKOFF_RESET_AFTER:
                    backoff = BACKOFF_FIRST
                log.warning(
                    "worker %d (pid %s) %s; restarting it in %.1fs (%d of %d workers serving)",
                    slot.index,
                    _pid(slot),
                    describe_exit(code),
                    backoff,
                    self._serving(),
                    self.count,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._halt.wait(), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        except Exception:
            log.exception("supervising worker %d failed: stopping", slot.index)
            self._exit_code = self._exit_code or 1
            self._halt.set()

    async def _run_once(self, slot: _Slot, metrics: str | None) -> tuple[int, float | None]:
        """Runs one process of the worker to its end: (its exit status, how
        long it served, None if it never did)."""
        slot.serving_since = None
        slot.held = None if self._all_serving.is_set() else []
        env = {**os.environ, "LEDGER_WORKERS": "1", WORKER_INDEX_ENV: str(slot.index)}
        ready_read, ready_write = os.pipe()
        env[WORKER_READY_FD_ENV] = str(ready_write)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(slot.index, metrics),
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=(ready_write,),
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            os.close(ready_read)
            log.error("cannot start worker %d: %s", slot.index, exc)
            return 1, None
        finally:
            os.close(ready_write)  # the worker's copy is the only one: EOF when it exits
        slot.proc = proc
        if self._halt.is_set():  # halted while it was being started
            _send(proc, signal.SIGTERM)
        assert proc.stderr is not None
        ends = {
            asyncio.create_task(self._await_ready(slot, ready_read)),
            asyncio.create_task(self._relay(slot, proc.stderr)),
        }
        code = await proc.wait()
        _, late = await asyncio.wait(ends, timeout=DRAIN_TIMEOUT)
        for task in late:
            task.cancel()
        served = None if slot.serving_since is None else time.monotonic() - slot.serving_since
        slot.serving_since = None
        return code, served

    async def _await_ready(self, slot: _Slot, fd: int) -> None:
        """Marks the worker serving when it writes to its ready pipe (EOF: it
        exited first)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            if not await reader.readline():
                return
        finally:
            transport.close()
        slot.serving_since = time.monotonic()
        self._release(slot)
        serving = self._serving()
        if self._all_serving.is_set():
            log.info(
                "worker %d (pid %s) serving again (%d of %d workers serving)",
                slot.index,
                _pid(slot),
                serving,
                self.count,
            )
        elif serving == self.count:
            self._all_serving.set()

    async def _relay(self, slot: _Slot, stream: asyncio.StreamReader) -> None:
        """Copies the worker's stderr, line by line, until it closes: read
        all the time, so that a worker never waits on a full pipe."""
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # the end
                if exc.partial:
                    self._emit(slot, exc.partial)
                return
            except asyncio.LimitOverrunError as exc:
                line = await stream.readexactly(exc.consumed)
            self._emit(slot, line)

    def _emit(self, slot: _Slot, line: bytes) -> None:
        if slot.muted:
            return
        if slot.held is not None:
            slot.held.append(line)
        else:
            _write(line)

    def _release(self, slot: _Slot) -> None:
        """Relays what the worker said while its output was held, and the rest as it comes."""
        held, slot.held = slot.held, None
        if not slot.muted:
            for line in held or ():
                _write(line)

    def _fail_start(self, slot: _Slot, code: int) -> None:
        """A worker exited before it ever served, during the first start: its
        lines say why; the others' (likely the same) are dropped."""
        for other in self._slots:
            if other is not slot:
                other.muted = True
        self._release(slot)
        log.error(
            "worker %d (pid %s) %s before it served: stopping",
            slot.index,
            _pid(slot),
            describe_exit(code),
        )
        self._exit_code = code if code > 0 else 1
        self._halt.set()

    def _serving(self) -> int:
        return sum(slot.serving_since is not None for slot in self._slots)

    def _forward_hangup(self) -> None:
        if not self.settings.auth_file:
            log.info("SIGHUP ignored: there is no auth file to re-read")
            return
        for slot in self._slots:
            # Only to those serving: before its handler is set, SIGHUP would end a worker.
            if slot.proc is not None and slot.serving_since is not None:
                _send(slot.proc, signal.SIGHUP)

    async def _stop_all(self, tasks: list[asyncio.Task[None]]) -> None:
        """SIGTERM to every worker; SIGKILL to those still running after the grace."""
        grace = self.settings.shutdown_grace + STOP_MARGIN
        running = [s.proc for s in self._slots if s.proc is not None and s.proc.returncode is None]
        if self._exit_code == 0:
            log.info(
                "shutting down: %d workers draining for up to %.1fs",
                len(running),
                self.settings.shutdown_grace,
            )
        for proc in running:
            _send(proc, signal.SIGTERM)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            for slot in self._slots:
                if slot.proc is not None and slot.proc.returncode is None:
                    log.warning(
                        "worker %d (pid %s) still runs after %.1fs: killing it",
                        slot.index,
                        _pid(slot),
                        grace,
                    )
                    _send(slot.proc, signal.SIGKILL)
            _, pending = await asyncio.wait(pending, timeout=DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
        if self._exit_code == 0:
            log.info("stopped")


def _pid(slot: _Slot) -> str:
    return str(slot.proc.pid) if slot.proc is not None else "-"


def _send(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just exited
        proc.send_signal(sig)


def _write(line: bytes) -> None:
    with contextlib.suppress(OSError):  # nobody reads our stderr any more
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
