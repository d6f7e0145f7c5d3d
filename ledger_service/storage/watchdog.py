"""Ends database waits that outlive their bound, whatever the network does.

A connection that goes silent (a dropped NAT entry, a failover behind a
virtual IP) never answers, and neither the server-side timeouts nor a cancel
request, which may not get through either, end the wait. So the wait is
given a time; past it the watchdog shuts the connection's socket down, and
whichever thread or task waits on it wakes at once with a connection error.
The connection is then closed by its owner and never reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Watch:
    """One watched wait: `fired` tells whether it was cut off."""

    __slots__ = ("_fd", "fired", "until")

    def __init__(self, fd: int, until: float) -> None:
        # A duplicate of the socket: if its owner closes the original and the
        # number is reused meanwhile, a shutdown still reaches this socket only.
        self._fd = os.dup(fd)
        self.until = until
        self.fired = False

    def _cut(self) -> None:
        # Marked first: whoever wakes with the connection error sees why.
        self.fired = True
        sock = socket.socket(fileno=self._fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected: its waiter has woken anyway
        finally:
            sock.detach()

    def _close(self) -> None:
        os.close(self._fd)


class Watchdog:
    """`with watchdog.watching(fd, until): ...` for a blocking or asyncio wait
    on the socket `fd`; `until` is a time.monotonic() value. One thread,
    started on first use, checks the watched waits every `tick` seconds."""

    def __init__(self, tick: float = 0.1) -> None:
        self._tick = tick
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    def start(self, fd: int, until: float) -> Watch:
        watch = Watch(fd, until)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ledger-db-watchdog", daemon=True
                )
                self._thread.start()
        return watch

    def end(self, watch: Watch) -> bool:
        """Stops watching; True if the wait was cut off."""
        with self._lock:
            self._watches.discard(watch)
        watch._close()
        return watch.fired

    @contextlib.contextmanager
    def watching(self, fd: int, until: float) -> Iterator[Watch]:
        watch = self.start(fd, until)
        try:
            yield watch
        finally:
            self.end(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._watches if not w.fired and w.until <= now]
                # Under the lock: end() cannot close a socket being cut.
                for watch in due:
                    watch._cut()
            for _ in due:
                log.warning(
                    "the database gave no answer in time: closed the connection "
                    "(its statement's outcome is unknown; retrying with the same "
                    "idempotency key is safe)"
                )


# One per process: every database wait of the server is watched by it.
WATCHDOG = Watchdog()
