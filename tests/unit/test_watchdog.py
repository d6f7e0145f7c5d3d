"""The watchdog ends waits on a socket that outlive their bound (storage/watchdog.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

from ledger_service.storage.watchdog import Watch, Watchdog


def test_a_blocked_reader_wakes_when_its_bound_passes_and_the_watch_says_so() -> None:
    watchdog = Watchdog(tick=0.02)
    ours, peer = socket.socketpair()
    with ours, peer:
        got: list[bytes] = []
        with watchdog.watching(ours.fileno(), time.monotonic() + 0.2) as watch:
            reader = threading.Thread(target=lambda: got.append(ours.recv(10)))
            reader.start()
            reader.join(timeout=10)  # without the watchdog: forever (the peer never writes)
        assert not reader.is_alive()
        assert got == [b""]  # the end of the stream, as a dropped connection reads
        assert watch.fired


def test_an_asyncio_reader_wakes_too() -> None:
    watchdog = Watchdog(tick=0.02)
    ours, peer = socket.socketpair()
    ours.setblocking(False)

    async def read() -> bytes:
        loop = asyncio.get_running_loop()
        with watchdog.watching(ours.fileno(), time.monotonic() + 0.2):
            async with asyncio.timeout(10):
                return await loop.sock_recv(ours, 10)

    with ours, peer:
        assert asyncio.run(read()) == b""


def test_a_wait_that_ends_in_time_is_left_alone() -> None:
    watchdog = Watchdog(tick=0.02)
    ours, peer = socket.socketpair()
    with ours, peer:
        with watchdog.watching(ours.fileno(), time.monotonic() + 0.3) as watch:
            peer.sendall(b"answer")
            assert ours.recv(10) == b"answer"
        time.sleep(0.5)  # well past the bound: nothing is cut once the watch ended
        assert not watch.fired
        peer.sendall(b"later")
        assert ours.recv(10) == b"later"


def test_a_cut_reaches_only_the_watched_socket_even_if_its_number_is_reused() -> None:
    """The owner closes the watched socket and the number goes to a new
    socket before the bound passes: the cut must not touch the new one."""
    watchdog = Watchdog(tick=0.02)
    first, first_peer = socket.socketpair()
    number = first.fileno()
    watch = watchdog.start(number, time.monotonic() + 0.2)
    first.close()
    second, second_peer = socket.socketpair()
    try:
        if second.fileno() != number:  # make the reuse happen
            os.dup2(second.fileno(), number)
            second.close()
            second = socket.socket(fileno=number)
        time.sleep(0.5)
        assert watch.fired
        second_peer.sendall(b"still open")
        assert second.recv(20) == b"still open"
    finally:
        watchdog.end(watch)
        for s in (first_peer, second, second_peer):
            s.close()


def test_whoever_wakes_from_a_cut_already_sees_it_marked() -> None:
    """The waiter decides what to tell its caller by `fired` while it still
    holds the watch (the listener's probe does), so the mark must come before
    the shutdown that wakes it."""
    watchdog = Watchdog(tick=0.01)

    def read(sock: socket.socket, watch: Watch, seen: list[bool]) -> None:
        sock.recv(10)
        seen.append(watch.fired)

    for _ in range(20):
        ours, peer = socket.socketpair()
        with ours, peer:
            seen: list[bool] = []
            with watchdog.watching(ours.fileno(), time.monotonic() + 0.05) as watch:
                reader = threading.Thread(target=read, args=(ours, watch, seen))
                reader.start()
                reader.join(timeout=10)
            assert seen == [True]
